#!/usr/bin/env bash
# Fourth GPU session (device tool, repo root, carry .devwheels and .data). Parts:
#   step:   the supernet step benchmark (reference vs hard + bits) and a profile of the hard step
#   sweep:  `fbnas search -m` over the latency exponent ($BETAS)
#   heff:   the Hessian search effect, bits-only searches side by side ($SEEDS x $BETAS x $GAMMAS;
#           a BETAS entry is default, a latency exponent, or t<ms> for a latency target)
set -u
part=${1:-step}
source bench/gpu_env.sh
if [ "$part" = step ]; then
  timeout 200 python3 bench/supernet_step.py --device cuda --batch 256 --steps 30 --warmup 5 \
    --configs ${CONFIGS:-reference_fp32_all_paths,fbnas_hard_bits} --out "$OUT/supernet_step_cuda.json" 2>&1 \
    | grep -v Warn | tee "$OUT/supernet_step.txt"
  timeout 100 python3 bench/supernet_step.py --device cuda --batch 256 --steps 10 --warmup 5 --profile \
    --configs fbnas_hard_bits 2>&1 | grep -v Warn > "$OUT/supernet_step_profile.txt"
  head -n 45 "$OUT/supernet_step_profile.txt" | cut -c1-60,100-200
fi
if [ "$part" = heff ]; then  # bits-only Hessian search effect, side by side: gammas x latency exponents
  rm -rf /tmp/gs /tmp/heff; mkdir -p /tmp/gs /tmp/heff
  for seed in ${SEEDS:-0}; do
  for beta in ${BETAS:-default 0.2}; do
    for g in ${GAMMAS:-0 0.05 0.15}; do
      case $beta in default) b="";; t*) b="--latency-target ${beta#t}";; *) b="--beta $beta";; esac
      name=s${seed}_b${beta}_g$g
      timeout 540 python3 bench/hessian_search_effect.py --space fmnist_deep --fixed-op ir_k3_e3 --accelerator cuda \
        --threads 2 --gammas $g $b --seed $seed --epochs 6 --warmup-epochs 2 --steps 100 --batch-size 128 \
        --train-subset 16000 --runs /tmp/gs/$name --out /tmp/heff/hessian_search_effect_bits_cuda_$name \
        > /tmp/heff/$name.log 2>&1 &
    done
  done
  done
  wait
  for f in /tmp/heff/*.md; do echo "== $f"; grep -A 4 "^| gamma" $f; done | tee "$OUT/heff_summary.txt"
  tar czf "$OUT/heff.tgz" -C /tmp heff
fi
if [ "$part" = sweep ]; then  # the latency-weight sweep as a Hydra multirun, on the GPU
  timeout 560 python3 -m fbnas.cli search -m accelerator=cuda objective.beta=${BETAS:-0.0,0.6,1.5} progress=false \
    hydra.sweep.dir=/tmp/sweep > "$OUT/sweep.log" 2>&1; echo "sweep rc=$?"
  python3 bench/summarize_runs.py /tmp/sweep | tee "$OUT/sweep_summary.txt"
fi
