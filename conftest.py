"""Fixtures shared by tests/ and the dataset's own tests (tfds_ispy2/)."""

import pytest

from fake_data import tcia_fixtures


@pytest.fixture(scope='session')
def tcia_tree(tmp_path_factory):
  """The default TCIA-like DICOM tree of fake_data.tcia_fixtures and its ground truth, written once
  (read-only for every test: builds write to their own data_dir)."""
  root = tmp_path_factory.mktemp('tcia_manual')
  return root, tcia_fixtures.write_tcia_tree(root)


@pytest.fixture(scope='session')
def vendor_tree(tmp_path_factory):
  """One fixture-size patient per vendor's header layout (tcia_fixtures.VENDOR_CASES: GE,
  Siemens, Philips; T0 and T1) and its ground truth."""
  root = tmp_path_factory.mktemp('tcia_vendors')
  return root, tcia_fixtures.write_tcia_tree(root, tcia_fixtures.VENDOR_CASES)
