"""Fake-data writers for the tests and for `tfds_ispy2/ispy2/dummy_data/`; not shipped.

They live outside the installed packages, where TFDS keeps its fake-data generators: a wheel of
`pcrjax` carries the readers, not the pydicom writers of TCIA-like trees that test them.
"""
