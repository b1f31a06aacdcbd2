"""A run's own config, read back from its workdir's config.json.

python -m pcrjax.main --config=workdir:WORKDIR --workdir=WORKDIR

reruns WORKDIR exactly as it was started (`--config.<field>=` still overrides); the protocol starts
its parallel trainings this way (`--config.protocol.task=T`).
"""

from pcrjax import runs


def get_config(workdir: str):
  return runs.read_config(workdir)
