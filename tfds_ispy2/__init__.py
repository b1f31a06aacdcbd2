"""TFDS datasets of pcrjax: importing the package registers them, as `import tensorflow_datasets` does."""

# Mends TFDS where its tensorflow-metadata is code for a newer protobuf than the one installed
# (Colab's GPU runtime of 2026-08-19: tensorflow-metadata 1.21.0, protobuf 5.29.6).
MEND_TFDS = "pip install -q 'tensorflow-metadata==1.17.3'"

# Before TFDS, which logs this failure as a long traceback and goes on half imported.
try:
  from tensorflow_metadata.proto.v0 import schema_pb2  # noqa: F401
except (
    Exception
) as error:  # protobuf's VersionError: code generated for a newer protobuf.
  if type(error).__name__ != 'VersionError':
    raise
  raise ImportError(
      f'TFDS cannot work here: {error} To mend it: {MEND_TFDS}'
  ) from None

from tfds_ispy2.ispy2 import ispy2_dataset_builder  # noqa: E402,F401  Registers `ispy2`.
