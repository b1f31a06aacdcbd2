"""pcrjax: early pCR prediction from longitudinal DCE-MRI, two-stage dual-task (Jing & Wang 2025)."""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent
REQUIREMENTS = [line.strip() for line in (HERE / 'requirements.txt').read_text().splitlines()
                if line.strip() and not line.startswith('#')]

setuptools.setup(
    name='pcrjax',
    version='0.1.0',
    description=__doc__,
    long_description=(HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['pcrjax', 'pcrjax.*', 'tfds_ispy2', 'tfds_ispy2.*']),
    package_data={'tfds_ispy2.ispy2': ['README.md', 'CITATIONS.bib', 'checksums.tsv', 'dummy_data/**/*']},
    install_requires=REQUIREMENTS,
    extras_require={'test': ['pytest==9.2.0']},
)
