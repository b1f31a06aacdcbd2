#!/usr/bin/env bash
# The accelerator check, one script: the benchmark (float32 and bfloat16) and the README main
# command's protocol on one GPU, every figure printed. Under 10 minutes on an H100/H200-class card.
#
#   pip install -r requirements.txt -e '.[benchmarks]' 'jax[cuda13]'   # once, on the GPU machine
#   bash benchmarks/gpu.sh [OUT]                                          # OUT: /tmp/pcrjax_gpu
set -euo pipefail
OUT=${1:-/tmp/pcrjax_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c 'import jax; print("JAX", jax.__version__, jax.devices())'

# Step, evaluation and pipeline figures, the PyTorch twin A B A B, MFU against the bf16 peak.
python -m benchmarks.run --out="$OUT/bench_f32" --steps=50 --scaling=''
python -m benchmarks.run --out="$OUT/bench_bf16" --dtype=bfloat16 --steps=50 --scaling=''

# The protocol of the README main command: the dataset build timed apart, then the 15 trainings,
# the reference fits and the report (no persistent compilation cache: a cold start).
start=$(date +%s)
python -m tfds_ispy2.build ispy2/synthetic --data_dir="$OUT/tfds" --file_format=array_record
build_s=$(( $(date +%s) - start ))
start=$(date +%s)
python -m pcrjax.main --config=paper_table --workdir="$OUT/table" --config.data.data_dir="$OUT/tfds" \
  --compilation_cache='' 2>"$OUT/protocol.log"
protocol_s=$(( $(date +%s) - start ))

echo; echo "== float32"; cat "$OUT/bench_f32/results.md"
echo; echo "== bfloat16"; cat "$OUT/bench_bf16/results.md"
echo; echo "== protocol: dataset build ${build_s} s, protocol ${protocol_s} s"
python - "$OUT/table" <<'PY'
import json, pathlib, statistics, sys
run = pathlib.Path(sys.argv[1])
print((run / 'table.csv').read_text())
for stage in ('baseline', 'teacher', 'student'):
  seconds = [json.loads(line)['epoch_seconds'] for path in run.glob(f'repeat_*/fold_*/{stage}/metrics.jsonl')
             for line in path.read_text().splitlines()[1:]]
  print(f'{stage}: median epoch {statistics.median(seconds):.3f} s over {len(seconds)} epochs')
PY
