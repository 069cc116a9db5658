#!/usr/bin/env bash
# Second GPU session, part A (device tool, repo root, carry .devwheels and .data): the supernet step after
# the sampler stopped waiting on the device, and integer deployment with the mixed model fine-tuned from W8A8.
set -u
mkdir -p /usr/share/datasets && cp -r .data/fashion-mnist /usr/share/datasets/
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devwheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"; rm -rf /tmp/fbnas_int
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 170 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
  --configs reference_fp32_all_paths,fbnas_hard_bits,fbnas_hard_bits_channels_last,fbnas_soft_bits \
  --out "$OUT/supernet_step_cuda.json" 2>&1 | grep -v Warn | tee "$OUT/supernet_step.txt"
timeout 400 python3 bench/int_deploy.py --device cuda --no-ort --epochs 8 --fold-epochs 2 --steps 300 \
  --runs /tmp/fbnas_int --out "$OUT/int_deploy.md" > "$OUT/int_deploy.log" 2>&1; echo "int_deploy rc=$?"
tar czf "$OUT/int_runs.tgz" -C /tmp fbnas_int --exclude=checkpoints 2>/dev/null
cat "$OUT/int_deploy.md" 2>/dev/null; tail -n 3 "$OUT/int_deploy.log"
