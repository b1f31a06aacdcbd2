"""`tfds build` for this dataset, without TensorFlow or Apache Beam installed.

    python -m tfds_ispy2.build ispy2/tcia --manual_dir=DIR --data_dir=DIR --file_format=array_record

takes exactly the arguments of `tfds build` and runs TFDS's own build command, from any working
directory: importing tfds_ispy2 registers `ispy2`, so the dataset is given by name (or by the path of
its folder, as to `tfds build`). The `tfds` script of tensorflow-datasets 4.9.10 imports TensorFlow and
apache_beam at start-up, even for ArrayRecord builds; its `build` command itself needs neither.
"""

import simple_parsing
from tensorflow_datasets.scripts.cli import build

import tfds_ispy2  # noqa: F401  Registers the datasets, so that `build` finds them by name.


def main() -> None:
  simple_parsing.parse(build.Args).execute()


if __name__ == '__main__':
  main()
