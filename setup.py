"""pcrjax: early pCR prediction from longitudinal DCE-MRI, two-stage dual-task (Jing & Wang 2025)."""

import pathlib

import setuptools
from setuptools.command import build_py

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [line.strip() for line in (HERE / 'requirements.txt').read_text().splitlines()
                if line.strip() and not line.startswith('#')]


class BuildPyWithoutTests(build_py.build_py):
  """Leaves `*_test` modules out of the wheel: TFDS keeps a builder's test beside the builder."""

  def find_package_modules(self, package, package_dir):
    modules = super().find_package_modules(package, package_dir)
    return [(pkg, module, path) for pkg, module, path in modules if not module.endswith('_test')]


setuptools.setup(
    name='pcrjax',
    version='0.1.0',
    description=__doc__,
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['pcrjax', 'pcrjax.*', 'tfds_ispy2', 'tfds_ispy2.*']),
    # dummy_data/**/.*: the tree's .DS_Store, clutter that the reader must skip.
    package_data={'tfds_ispy2.ispy2': ['README.md', 'CITATIONS.bib', 'checksums.tsv',
                                       'dummy_data/**/*', 'dummy_data/**/.*']},
    install_requires=REQUIREMENTS,
    extras_require={'test': ['pytest==9.2.0', 'wheel==0.45.1']},
    cmdclass={'build_py': BuildPyWithoutTests},
)
