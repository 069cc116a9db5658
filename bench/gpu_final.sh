#!/usr/bin/env bash
# The combined GPU session (device tool, repo root, carry .devwheels and .data): supernet step, integer
# deployment accuracy (onnxruntime checks run later on CPU from the returned run directories), Hessian speed,
# LUT additivity on CUDA. Each part is time-boxed so the whole stays under 10 minutes.
set -u
source bench/gpu_env.sh
mkdir -p bench/results
timeout 110 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
  --configs reference_fp32_all_paths,fbnas_hard_bits,fbnas_soft_bits --out "$OUT/supernet_step_cuda.json" 2>&1 \
  | grep -v Warn | tee "$OUT/supernet_step.txt"
timeout 210 python3 bench/int_deploy.py --device cuda --no-ort --epochs 6 --fold-epochs 2 --steps 200 \
  --runs /tmp/fbnas_int --out "$OUT/int_deploy.md" > "$OUT/int_deploy.log" 2>&1; echo "int_deploy rc=$?"
tar czf "$OUT/int_runs.tgz" -C /tmp fbnas_int --exclude=checkpoints 2>/dev/null
timeout 160 python3 bench/hessian.py --device cuda --max-probes 3000 --train-steps 150 --out "$OUT/hessian_speed_cuda" > "$OUT/hessian_speed.log" 2>&1
echo "hessian rc=$?"; tail -n 15 "$OUT/hessian_speed.log"
timeout 95 python3 bench/lut_additivity.py --backend cuda --archs 50 --out "$OUT/lut_additivity_cuda.json" \
  > "$OUT/lut_additivity_cuda.txt" 2>&1; echo "lut rc=$?"; tail -n 8 "$OUT/lut_additivity_cuda.txt"
cat "$OUT/int_deploy.md" 2>/dev/null; tail -n 3 "$OUT/int_deploy.log"
