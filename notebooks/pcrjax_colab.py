# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
# ---

# %% [markdown]
# # pcrjax on Colab: early pCR prediction, teacher and student
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/pcrjax/blob/main/notebooks/pcrjax_colab.ipynb)
#
# The badge opens this file from GitHub: replace `OWNER` in its link (and `REPO_URL` below) by
# the GitHub account that hosts pcrjax. `notebooks/pcrjax_colab.py` is the same notebook as a
# jupytext script, for reviewable diffs; edit either and run `jupytext --sync` on it.
#
# On Colab, pick an accelerator (Runtime > Change runtime type) and run the cells in order. The
# synthetic smoke cohort takes minutes; the TCIA section at the end needs the I-SPY2 download.

# %% [markdown]
# ## Install
# `pip install` keeps what Colab has: pcrjax's floors are no newer than the versions of Colab's
# runtime (tested against the GPU and TPU runtimes of 2026-08-19), so its JAX, NumPy and SciPy
# stay. On the GPU runtime TFDS itself cannot import (its tensorflow-metadata needs a newer protobuf
# than the runtime's); the last line then replaces that one package.

# %% tags=["colab"]
REPO_URL = 'https://github.com/OWNER/pcrjax'
# !git clone -q --depth 1 {REPO_URL} /content/pcrjax
# !pip install -q /content/pcrjax
# !python -c 'import tensorflow_datasets' 2>/dev/null || pip install -q 'tensorflow-metadata==1.17.3'

# %% [markdown]
# ## Setup
# Not under `absl.app.run`: the flags are marked parsed, which grain's worker processes need.
# `WORKDIR` and `TFDS_DATA_DIR` (where the dataset is built) can be set in the environment.

# %%
import io
import json
import os

import jax
import matplotlib.pyplot as plt
from absl import flags
from IPython.display import Image, Markdown, display

from pcrjax import configs, input_pipeline, protocol, runs, train

flags.FLAGS.mark_as_parsed()
WORKDIR = os.environ.get('PCRJAX_WORKDIR', '/content/pcrjax_smoke')
NUM_EPOCHS = int(os.environ.get('PCRJAX_NUM_EPOCHS', '2'))
NUM_REPEATS = int(os.environ.get('PCRJAX_NUM_REPEATS', '2'))
jax.devices()

# %% [markdown]
# ## The synthetic smoke cohort
# The paper's protocol as `--config=paper_table:smoke` gives it; the first load builds the
# `ispy2/synthetic_smoke` TFDS dataset.

# %%
config = configs.load('paper_table:smoke')
config.data.data_dir = os.environ.get('TFDS_DATA_DIR', '/content/tensorflow_datasets')
config.num_epochs = NUM_EPOCHS
config.warmup_epochs = min(config.warmup_epochs, NUM_EPOCHS - 1)
config.protocol.num_repeats = NUM_REPEATS
configs.validate(config)
cohort = input_pipeline.read_cohort(input_pipeline.load_source(config.data, with_images=False))
print(f'{len(cohort)} patients, {int(cohort.pcr.sum())} with pCR')

# %% [markdown]
# ## Teacher and student on one fold
# Trained where the protocol keeps repeat 0, fold 0, so that the protocol below skips them. The
# student (T0+T1) learns from this fold's teacher (T0+T1+T2).

# %%
for stage in ('teacher', 'student'):
  train.train_and_evaluate(protocol.stage_config(config, stage, 0, 0, WORKDIR),
                           runs.stage_dir(WORKDIR, 0, 0, stage))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for stage in ('teacher', 'student'):
  with open(os.path.join(runs.stage_dir(WORKDIR, 0, 0, stage), runs.METRICS_FILE)) as f:
    epochs = [json.loads(line) for line in f]
  for ax, key in zip(axes, ('train_loss', 'val_auroc')):
    ax.plot([e['epoch'] for e in epochs], [e[key] for e in epochs], marker='o', label=stage)
    ax.set(xlabel='epoch', title=key)
axes[0].legend()
fig.savefig(png := io.BytesIO(), format='png')  # Inline whatever the backend (pcrjax's is Agg).
plt.close(fig)
display(Image(png.getvalue()))

# %% [markdown]
# ## The protocol and its report
# Every network on every fold of every repeat, the reference models, then the report.

# %%
table = protocol.run(config, WORKDIR)
with open(os.path.join(WORKDIR, runs.REPORT_FILE)) as f:
  display(Markdown(f.read()))

# %% [markdown]
# ## The I-SPY2 TCIA download on Google Drive
# Put the TCIA download (images and the clinical spreadsheets, as the `ispy2/tcia` builder's
# README lists them) in a Drive folder and name it in `data.manual_dir`. The full protocol trains
# 5 folds x 3 networks for 60 epochs each: hours, on an accelerator.

# %% tags=["colab"]
from google.colab import drive

drive.mount('/content/drive')
tcia = configs.load('paper_table')
tcia.data.dataset = 'ispy2/tcia'
tcia.data.data_dir = '/content/drive/MyDrive/tensorflow_datasets'
tcia.data.manual_dir = '/content/drive/MyDrive/ispy2_tcia'
configs.validate(tcia)
protocol.run(tcia, '/content/drive/MyDrive/pcrjax_runs/paper_table')
