#!/usr/bin/env bash
# Second GPU session (device tool, repo root, carry .devwheels and .data). Part "deploy": integer deployment
# with a loss-measured ILP and the mixed model fine-tuned from W8A8, then the supernet step. Part "final": the supernet step,
# Hessian-trace speed and GPU searches (platform awareness, Hessian effect).
set -u
part=${1:-deploy}
source bench/gpu_env.sh
if [ "$part" = deploy ]; then
  rm -rf /tmp/fbnas_int
  timeout 330 python3 bench/int_deploy.py --device cuda --no-ort --epochs 8 --fold-epochs 2 --steps 300 \
    --runs /tmp/fbnas_int --out "$OUT/int_deploy.md" > "$OUT/int_deploy.log" 2>&1; echo "int_deploy rc=$?"
  tar czf "$OUT/int_runs.tgz" -C /tmp fbnas_int --exclude=checkpoints 2>/dev/null
  cat "$OUT/int_deploy.md" 2>/dev/null; tail -n 3 "$OUT/int_deploy.log"
  timeout 200 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
    --configs reference_fp32_all_paths,fbnas_hard_bits,fbnas_hard_bits_channels_last \
    --out "$OUT/supernet_step_cuda.json" 2>&1 | grep -v Warn | tee "$OUT/supernet_step.txt"
fi
if [ "$part" = hessian ]; then
  timeout 150 python3 bench/hessian.py --device cuda --max-probes 200 --train-steps 100 \
    --out "$OUT/hessian_speed_cuda" > "$OUT/hessian_speed.log" 2>&1; echo "hessian rc=$?"
  tail -n 14 "$OUT/hessian_speed.log"
  rm -rf /tmp/gs; mkdir -p /tmp/gs
  timeout 390 python3 bench/hessian_search_effect.py --accelerator cuda --threads 8 --gammas 0,0.5 --epochs 6 \
    --warmup-epochs 2 --steps 100 --batch-size 128 --train-subset 16000 --runs /tmp/gs/heff \
    --out "$OUT/hessian_search_effect_cuda" > "$OUT/hessian_search_effect.log" 2>&1; echo "effect rc=$?"
  tail -n 30 "$OUT/hessian_search_effect.log"
fi
if [ "$part" = final ]; then
  timeout 170 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
    --configs reference_fp32_all_paths,fbnas_hard_bits --out "$OUT/supernet_step_cuda.json" 2>&1 \
    | grep -v Warn | tee "$OUT/supernet_step.txt"
  timeout 200 python3 bench/hessian.py --device cuda --max-probes 800 --train-steps 100 \
    --out "$OUT/hessian_speed_cuda" > "$OUT/hessian_speed.log" 2>&1; echo "hessian rc=$?"
  tail -n 14 "$OUT/hessian_speed.log"
  rm -rf /tmp/gs; mkdir -p /tmp/gs
  for dev in sd835 bitfusion; do
    timeout 170 python3 -m fbnas.cli search accelerator=cuda device=$dev threads=2 progress=false \
      hydra.run.dir=/tmp/gs/$dev > /tmp/gs/$dev.log 2>&1 &
  done
  timeout 170 python3 bench/hessian_search_effect.py --accelerator cuda --threads 4 --gammas 0,0.5 --epochs 6 \
    --warmup-epochs 2 --steps 120 --batch-size 128 --train-subset 16000 --runs /tmp/gs/heff \
    --out "$OUT/hessian_search_effect_cuda" > "$OUT/hessian_search_effect.log" 2>&1 &
  wait
  for d in sd835 bitfusion; do echo "== $d"; tail -n 9 /tmp/gs/$d.log; done | tee "$OUT/gpu_searches.txt"
  tail -n 30 "$OUT/hessian_search_effect.log"
  tar czf "$OUT/gpu_searches.tgz" -C /tmp gs --exclude=checkpoints 2>/dev/null
fi
