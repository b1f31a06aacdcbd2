"""pcrjax: early pCR prediction from longitudinal DCE-MRI, two-stage dual-task (Jing & Wang 2025)."""

import logging

# absl first: it makes the 'absl' logger an ABSLLogger only if the logger does not exist yet, and a
# plain one would name absl's own file, not the caller, in every line (and in record.pathname,
# which pcrjax.console reads to tell pcrjax's lines from the libraries').
from absl import logging as absl_logging


class _WithoutGrainProfilingWarning(logging.Filter):
  """Drops grain's import-time warning that profiling its worker processes needs jaxlib >= 0.11.

  pcrjax never profiles grain's workers, and on an older JAX (Colab's) the warning would open every
  command. Installed here, before any pcrjax module imports grain.
  """

  def filter(self, record):
    return not str(record.msg).startswith(
        'Grain multiprocess worker profiling requires'
    )


absl_logging.get_absl_logger().addFilter(_WithoutGrainProfilingWarning())

# Before any pcrjax module imports TFDS: where TFDS cannot be imported, this says why in one line.
import tfds_ispy2  # noqa: E402,F401
