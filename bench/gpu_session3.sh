#!/usr/bin/env bash
# Third GPU session (device tool, repo root, carry .devwheels and .data). Parts:
#   probe:        CUDA-graph additivity (and eager for comparison), a profile of the hard supernet step, Hessian speed
#   step_hessian, step2: the supernet step (reference vs hard + bits), its profile, hvp_profile, Hessian speed
#   quality:      Hessian speed, then side by side: Hessian search effect, Gumbel vs ILP, the sweep and platform searches
#   final:        Gumbel vs ILP, gentler Hessian penalties, deployment (all side by side)
#   step:         the supernet step benchmark alone;  deploy: integer deployment alone ($DEPLOY_ARGS)
set -u
part=${1:-probe}
source bench/gpu_env.sh
if [ "$part" = probe ]; then
  timeout 150 python3 bench/lut_additivity.py --backend cuda --archs 50 --out "$OUT/lut_additivity_cuda.json" \
    > "$OUT/lut_additivity_cuda.txt" 2>&1; echo "additivity graphs rc=$?"; tail -n 2 "$OUT/lut_additivity_cuda.txt"
  timeout 100 python3 bench/lut_additivity.py --backend cuda --archs 50 --graph-unroll 0 \
    --out "$OUT/lut_additivity_cuda_eager.json" > "$OUT/lut_additivity_cuda_eager.txt" 2>&1
  echo "additivity eager rc=$?"; tail -n 2 "$OUT/lut_additivity_cuda_eager.txt"
  timeout 120 python3 bench/supernet_step.py --device cuda --batch 256 --steps 10 --warmup 5 --profile \
    --configs fbnas_hard_bits 2>&1 | grep -v Warn > "$OUT/supernet_step_profile.txt"; tail -n 45 "$OUT/supernet_step_profile.txt"
  timeout 200 python3 bench/hessian.py --device cuda --batch-size 64 --batches 1 --max-probes 600 --train-steps 100 \
    --out "$OUT/hessian_speed_cuda" > "$OUT/hessian_speed.log" 2>&1; echo "hessian rc=$?"
  tail -n 14 "$OUT/hessian_speed.log"
fi
if [ "$part" = step_hessian ]; then
  timeout 200 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
    --configs reference_fp32_all_paths,fbnas_hard_bits --out "$OUT/supernet_step_cuda.json" 2>&1 \
    | grep -v Warn | tee "$OUT/supernet_step.txt"
  timeout 100 python3 bench/hvp_profile.py --device cuda --batch-size 64 > "$OUT/hvp_profile.txt" 2>&1
  echo "hvp_profile rc=$?"; head -n 30 "$OUT/hvp_profile.txt"
  timeout 220 python3 bench/hessian.py --device cuda --batch-size 64 --batches 1 --max-probes ${HESS_PROBES:-128} \
    --train-steps 100 --out "$OUT/hessian_speed_cuda" > "$OUT/hessian_speed.log" 2>&1; echo "hessian rc=$?"
  tail -n 14 "$OUT/hessian_speed.log"
fi
if [ "$part" = quality ]; then
  timeout 200 python3 bench/hessian.py --device cuda --batch-size 64 --batches 1 --max-probes ${HESS_PROBES:-256} \
    --out "$OUT/hessian_speed_cuda" > "$OUT/hessian_speed.log" 2>&1; echo "hessian rc=$?"
  head -n 14 "$OUT/hessian_speed.log"
  rm -rf /tmp/gs; mkdir -p /tmp/gs
  for g in 0 0.5; do
    timeout 380 python3 bench/hessian_search_effect.py --accelerator cuda --threads 2 --gammas $g --epochs 6 \
      --warmup-epochs 2 --steps 100 --batch-size 128 --train-subset 16000 --runs /tmp/gs/heff$g \
      --out "$OUT/hessian_search_effect_cuda_g$g" > "$OUT/hessian_search_effect_g$g.log" 2>&1 &
  done
  timeout 380 python3 bench/gumbel_vs_ilp.py --device cuda --epochs 6 --fold-epochs 2 --steps 250 --search-steps 150 \
    --runs /tmp/gs/gvi --out "$OUT/gumbel_vs_ilp_cuda.md" > "$OUT/gumbel_vs_ilp.log" 2>&1 &
  for run in "sd835 objective.beta=0.0" "sd835 objective.beta=0.2" "sd835 objective.beta=0.6" \
             "sd835 objective.beta=1.5" "bitfusion objective.beta=0.6"; do
    set -- $run; name=$1_${2#objective.beta=}
    timeout 380 python3 -m fbnas.cli search accelerator=cuda device=$1 $2 threads=2 progress=false \
      hydra.run.dir=/tmp/gs/$name > /tmp/gs/$name.log 2>&1 &
  done
  wait
  for f in /tmp/gs/*.log; do echo "== $f"; tail -n 9 $f; done | tee "$OUT/gpu_searches.txt"
  cat "$OUT/gumbel_vs_ilp_cuda.md"; tail -n 3 "$OUT/gumbel_vs_ilp.log"
  for g in 0 0.5; do tail -n 25 "$OUT/hessian_search_effect_g$g.log"; done
  tar czf "$OUT/gpu_searches.tgz" -C /tmp gs --exclude=checkpoints 2>/dev/null
fi
if [ "$part" = step2 ]; then
  timeout 200 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
    --configs reference_fp32_all_paths,fbnas_hard_bits --out "$OUT/supernet_step_cuda.json" 2>&1 \
    | grep -v Warn | tee "$OUT/supernet_step.txt"
  timeout 100 python3 bench/supernet_step.py --device cuda --batch 256 --steps 10 --warmup 5 --profile \
    --configs fbnas_hard_bits 2>&1 | grep -v Warn > "$OUT/supernet_step_profile.txt"; head -n 30 "$OUT/supernet_step_profile.txt" | cut -c1-60,100-200
  timeout 280 python3 bench/hessian.py --device cuda --batch-size 64 --batches 1 --max-probes ${HESS_PROBES:-320} \
    --out "$OUT/hessian_speed_cuda" > "$OUT/hessian_speed.log" 2>&1; echo "hessian rc=$?"
  tail -n 40 "$OUT/hessian_speed.log"
fi
if [ "$part" = final ]; then
  rm -rf /tmp/gs /tmp/fbnas_int; mkdir -p /tmp/gs
  timeout 540 python3 bench/gumbel_vs_ilp.py --device cuda --epochs 5 --fold-epochs 1 --steps 250 --search-steps 120 \
    --runs /tmp/gs/gvi --out "$OUT/gumbel_vs_ilp_cuda.md" > "$OUT/gumbel_vs_ilp.log" 2>&1 &
  for g in ${GAMMAS:-0.05 0.15}; do
    timeout 540 python3 bench/hessian_search_effect.py --accelerator cuda --threads 2 --gammas $g --epochs 6 \
      --warmup-epochs 2 --steps 100 --batch-size 128 --train-subset 16000 --runs /tmp/gs/heff$g \
      --out "$OUT/hessian_search_effect_cuda_g$g" > "$OUT/heff_g$g.log" 2>&1 &
  done
  timeout 540 python3 bench/int_deploy.py --device cuda --no-ort --epochs 8 --fold-epochs 2 --steps 300 \
    --act-clip mse --w8-act-clip mse --runs /tmp/fbnas_int --out "$OUT/int_deploy.md" > "$OUT/int_deploy.log" 2>&1 &
  wait
  cat "$OUT/gumbel_vs_ilp_cuda.md"; tail -n 5 "$OUT/gumbel_vs_ilp.log"
  for g in ${GAMMAS:-0.05 0.15}; do grep -A 14 "^| gamma" "$OUT/hessian_search_effect_cuda_g$g.md"; tail -n 2 "$OUT/heff_g$g.log"; done
  cat "$OUT/int_deploy.md"; tail -n 3 "$OUT/int_deploy.log"
fi
if [ "$part" = step ]; then
  timeout 250 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
    --configs ${CONFIGS:-reference_fp32_all_paths,fbnas_hard_bits} --out "$OUT/supernet_step_cuda.json" 2>&1 \
    | grep -v Warn | tee "$OUT/supernet_step.txt"
fi
if [ "$part" = deploy ]; then
  rm -rf /tmp/fbnas_int
  timeout ${DEPLOY_TIMEOUT:-500} python3 bench/int_deploy.py --device cuda --no-ort ${DEPLOY_ARGS:-} \
    --runs /tmp/fbnas_int --out "$OUT/int_deploy.md" > "$OUT/int_deploy.log" 2>&1; echo "int_deploy rc=$?"
  tar czf "$OUT/int_runs.tgz" -C /tmp fbnas_int --exclude=checkpoints 2>/dev/null
  cat "$OUT/int_deploy.md" 2>/dev/null; tail -n 3 "$OUT/int_deploy.log"
fi
