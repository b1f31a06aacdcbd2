"""`tfds build` for this dataset, without TensorFlow or Apache Beam installed.

    python -m tfds_ispy2.build ispy2/tcia --manual_dir=DIR --data_dir=DIR --file_format=array_record

takes exactly the arguments of `tfds build` and runs TFDS's own build command, from any working
directory: importing tfds_ispy2 registers `ispy2`, so the dataset is given by name (or by the path of
its folder, as to `tfds build`). The `tfds` script of tensorflow-datasets 4.9.10 imports TensorFlow and
apache_beam at start-up, even for ArrayRecord builds; its `build` command itself needs neither.

The console keeps to what a user reads (pcrjax.console): TFDS's progress bars and its lines on
where the dataset goes, warnings, a TCIA build's summary; not TFDS's INFO lines, nor the
DatasetInfo that its command prints whole after a build (≈ 250 lines, the dataset's documentation:
`tfds.builder('ispy2/<config>').info` shows it).
"""

import contextlib
import sys

import simple_parsing
from tensorflow_datasets.scripts.cli import build

import tfds_ispy2  # noqa: F401  Registers the datasets, so that `build` finds them by name.
from pcrjax import console


class _WithoutDatasetInfo:
  """stdout, less the `print(repr(builder.info))` of TFDS's build command (one write, then its
  newline)."""

  def __init__(self, stream):
    self._stream, self._after_info = stream, False

  def write(self, text: str) -> int:
    after_info, self._after_info = self._after_info, text.startswith(
        'tfds.core.DatasetInfo('
    )
    if self._after_info or (after_info and text == '\n'):
      return len(text)
    return self._stream.write(text)

  def __getattr__(self, name: str):  # isatty, encoding, ...: the stream's.
    return getattr(self._stream, name)


def main() -> None:
  console.setup(own_info=True)
  with contextlib.redirect_stdout(_WithoutDatasetInfo(sys.stdout)):
    simple_parsing.parse(build.Args).execute()


if __name__ == '__main__':
  main()
