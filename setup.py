"""pcrjax: early pCR prediction from longitudinal DCE-MRI, two-stage dual-task (Jing & Wang 2025)."""

import pathlib

import setuptools
from setuptools.command import build_py

HERE = pathlib.Path(__file__).parent
# What pcrjax and tfds_ispy2 import, with floors that tests/test_colab.py installs and runs: Colab's
# versions (none is newer, so `pip install .` there replaces nothing) and, for what Colab lacks, the
# oldest tried. requirements.txt is the tested lock: `pip install -r requirements.txt`.
REQUIREMENTS = [
    'absl-py>=1.4',
    # TFDS's ArrayRecord format and data sources; no Windows wheels (grain's marker).
    'array_record>=0.8.3; sys_platform != "win32"',
    'clu>=0.0.12',
    'flax>=0.11.2',
    'grain>=0.2.18',
    'highdicom>=0.28',
    'importlib_resources>=7.1',  # tensorflow-datasets 4.9.10 imports it without declaring it.
    'jax>=0.7.2',
    'loky>=3.7',  # The build's process pool (tfds_ispy2): starts from guard-less scripts and notebooks.
    'markdown-it-py>=4.2',
    'matplotlib>=3.10',
    'ml_collections>=1.1',
    'numpy>=2.1.3',
    'openpyxl>=3.1',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.4',
    'pydicom>=3.0.1',
    'scikit-learn>=1.6.1',
    'scipy>=1.16.3',
    'SimpleITK>=2.5',
    'simple-parsing>=0.1',
    'tensorboardX>=2.6.1',
    'tensorflow-datasets>=4.9.10',  # tfds_ispy2.build runs build.Args, new in 4.9.10.
    # tfds_ispy2 imports its protos first, to name a protobuf mismatch in one line (MEND_TFDS).
    'tensorflow-metadata>=1.17.3',
    'tqdm>=4.67.3',
]


class BuildPyWithoutTests(build_py.build_py):
  """Leaves `*_test` modules out of the wheel: TFDS keeps a builder's test beside the builder."""

  def find_package_modules(self, package, package_dir):
    modules = super().find_package_modules(package, package_dir)
    return [
        (pkg, module, path)
        for pkg, module, path in modules
        if not module.endswith('_test')
    ]


setuptools.setup(
    name='pcrjax',
    version='0.1.0',
    description=__doc__,
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Medical Science Apps.',
    ],
    python_requires='>=3.11',
    # experiments/ ships as pcrjax.experiments, so that `--config=NAME` works after any install.
    packages=setuptools.find_packages(
        include=['pcrjax', 'pcrjax.*', 'tfds_ispy2', 'tfds_ispy2.*']
    )
    + ['pcrjax.experiments'],
    package_dir={'pcrjax.experiments': 'experiments'},
    # dummy_data/**/.*: the tree's .DS_Store, clutter that the reader must skip.
    package_data={
        'tfds_ispy2.ispy2': [
            'README.md',
            'CITATIONS.bib',
            'TAGS.txt',
            'checksums.tsv',
            'dummy_data/**/*',
            'dummy_data/**/.*',
        ]
    },
    install_requires=REQUIREMENTS,
    extras_require={
        'test': [
            'pytest==9.2.0',
            'wheel==0.45.1',
            'jupytext==1.19.6',
            'nbclient==0.11.0',
            'nbformat==5.11.1',
            'ipykernel==7.4.0',
            # tests/test_style.py: the formatter and linter of pyproject.toml.
            'pyink==26.5.1',
            'ruff==0.17.6',
        ],
        # The PyTorch twin of `python -m benchmarks.run` (benchmarks/README.md).
        'benchmarks': ['torch>=2.4'],
        # The `tcia` build as an Apache Beam pipeline (README: at scale).
        'beam': ['apache-beam>=2.77'],
        # `python -m tfds_ispy2.download`: the first idc-index whose series index has
        # SOPClassUID (idc-index-data 23.9.0), which the Analysis Mask rule reads.
        'download': ['idc-index>=0.11.13'],
        # `tfds build` as typed: tensorflow-datasets 4.9.10's script imports these at
        # start-up (and TensorFlow, which is installed for its hardware).
        'tfds-cli': ['apache-beam>=2.77', 'mlcroissant>=1.1.1'],
    },
    cmdclass={'build_py': BuildPyWithoutTests},
)
