"""TFDS datasets of pcrjax: importing the package registers them, as `import tensorflow_datasets` does."""

from tfds_ispy2.ispy2 import ispy2_dataset_builder  # noqa: F401  Registers `ispy2`.
