#!/usr/bin/env bash
# The GPU session for the core issue (run through the device tool from the repo root; hydra wheels in .devwheels).
set -uo pipefail
source bench/gpu_env.sh
mkdir -p bench/results
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/supernet_step.py --device cuda --batch 256 --steps 20 --warmup 5 \
  --out bench/results/supernet_step_cuda.json 2>&1 | grep -v Warn | tee "$OUT/supernet_step.txt"
cp bench/results/supernet_step_cuda.json "$OUT/"
python3 -m fbnas.cli search -m accelerator=cuda objective.beta=0.0,1.0,5.0 data.train_subset=0 epochs=10 \
  warmup_epochs=3 progress=false data.root=.data/fashion-mnist hydra.sweep.dir=/tmp/sweep > "$OUT/sweep_log.txt" 2>&1
python3 bench/summarize_runs.py /tmp/sweep | tee "$OUT/sweep_summary.txt"
