#!/usr/bin/env bash
# The GPU benchmarks, one part per call:  bash bench/gpu.sh <part>   (from the repository root); several parts
# (bash bench/gpu.sh <part> <part>...) run side by side, each part's output in $OUT/part_<part>.txt
#
#   step        supernet search step, every mode vs the all-paths fp32 reference ($CONFIGS), fbnet_cifar100
#   step_default_space   the same on the default search's space (fmnist, batch 128)
#   additivity  LUT additivity on CUDA, with CUDA graphs and eagerly
#   hessian     Hessian-trace speed vs a PyHessian-style loop ($HESS_PROBES probes at most), and the HVP profile
#   deploy      integer-only deployment accuracy: FP32, W8A8, ILP mixed bits ($DEPLOY_ARGS)
#   ilp         Gumbel-searched bits vs HAWQ-V3 ILP bits at equal bitfusion latency
#   heff        Hessian penalty vs searched bits, bits only ($SEEDS x $BETAS x $GAMMAS side by side; a BETAS
#               entry is default, a latency exponent, or t<ms> for a latency target)
#   sweep       the latency-weight sweep as a Hydra multirun ($BETAS, comma-separated)
#   platform    default searches for sd835 and bitfusion side by side
#   train       QAT W8A8 and FP32 training of arch.json files ($ARCHS), side by side
#   modes       one search per mode ($MODES, default soft,two_path,hard; two_path_a<K>: anchor_steps=K), each
#               alone on the GPU (SIDE_BY_SIDE=1: at once), at the Pareto study's sd835 0.6x budget and settings
#               ($LIMIT, $SPACE_ARGS): wall time per mode; with $TRAIN_SEEDS the found nets trained with the
#               study's recipe
#   pareto      the Pareto study (bench/pareto_study.py --searches-first) of $DEVICES with seeds $SEEDS
#   ddp         distributed overhead at world size 1 (target < 3%), then the search step on $GPUS GPUs (default: 1
#               and every GPU of the machine) at 256 images per GPU: img/s, scaling efficiency, memory, host syncs
#
# Results go to $OUT (default /tmp/out), with gpu.txt recording the GPU; copy what you keep to
# bench/results/<study>/<hardware>.{md,json}. Fashion-MNIST is read from .data/fashion-mnist and Python wheels
# the machine lacks (hydra-core, omegaconf, ...) from .devwheels/, both git-ignored folders you place next to
# the checkout.
set -u

prelude() {
  mkdir -p /usr/share/datasets && cp -r .data/fashion-mnist /usr/share/datasets/
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .devwheels/*.whl 2>/dev/null
  export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
}

part_step() {
  # every mode and the default on fbnet_cifar100, batch 256 (about 45 s per configuration: 10 by default, or
  # $CONFIGS): images/s, GPU time per step, memory, host syncs, ratios to the fp32 reference; the JSON is
  # rewritten after every configuration
  timeout 560 python3 bench/supernet_step.py --device cuda --batch 256 --steps 8 --warmup 2 \
    ${CONFIGS:+--configs "$CONFIGS"} --out "$OUT/supernet_step.json" 2>&1 | grep -v -i warn | tee "$OUT/supernet_step.txt"
}

part_step_default_space() {
  # the same on the default search's space (fmnist, batch 128)
  timeout 560 python3 bench/supernet_step.py --device cuda --space fmnist --batch 128 --steps 30 --warmup 5 \
    ${CONFIGS:+--configs "$CONFIGS"} --out "$OUT/supernet_step_fmnist.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/supernet_step_fmnist.txt"
}

part_ddp() {
  timeout 300 torchrun --nproc_per_node 1 bench/ddp_scaling.py --overhead --steps 10 --blocks 3 --out "$OUT/ddp_overhead.json" 2>&1 \
    | grep -v Warn | tee "$OUT/ddp_overhead.txt"
  local n_gpu; n_gpu=$(nvidia-smi -L | wc -l)
  for n in ${GPUS:-$( (echo 1; echo "$n_gpu") | sort -un)}; do
    timeout 500 torchrun --nproc_per_node "$n" bench/ddp_scaling.py --out "$OUT/ddp_scaling_$n.json" 2>&1 \
      | grep -v Warn | tee "$OUT/ddp_scaling_$n.txt"
  done
  python3 bench/ddp_scaling.py --summarize "$OUT"/ddp_scaling_*.json | tee "$OUT/ddp_scaling.md"
}

part_pareto() {
  # the Pareto study of $DEVICES (default sd835) with seeds $SEEDS ($PARETO_ARGS, default --searches-first: the
  # searches, then every training, found nets first); results in $OUT/pareto/<device>/ and $OUT/pareto.tgz.
  # Resumable: $OUT/ps_resume.tgz holds the finished searches and trainings (no weights); placed as
  # .pareto_work/ps_resume.tgz next to the checkout, it is unpacked into the work directory first
  [ -f .pareto_work/ps_resume.tgz ] && mkdir -p /tmp/ps && tar xzf .pareto_work/ps_resume.tgz -C /tmp
  FBNAS_EXTRA_PYTHONPATH=/tmp/site timeout "${PARETO_TIMEOUT:-540}" python3 bench/pareto_study.py \
    ${PARETO_ARGS---searches-first} --devices "${DEVICES:-sd835}" --seeds "${SEEDS:-0,1}" --work /tmp/ps \
    --out "$OUT/pareto" --workers-after 14 > "$OUT/pareto_study.log" 2>&1; echo "pareto_study rc=$?"
  tar czf "$OUT/pareto.tgz" -C "$OUT" pareto 2>/dev/null
  (cd /tmp && find ps \( -path '*/search/*' \( -name arch.json -o -name metrics.jsonl \) -o -name '*.log' \
    -o -path '*/pareto/results/*.json' -o -path '*/pareto/archs/*' \) -print0 | tar czf "$OUT/ps_resume.tgz" --null -T -)
  grep -v Warn "$OUT/pareto_study.log" | tail -n 40
}

part_modes() {
  # the study's search settings (bench/pareto_study.py): 16,000 training images, 6 epochs (hard: 8); $SPACE_ARGS
  # picks another space (e.g. "space=fbnet_cifar100 space_override.from_data=true": its layers on Fashion-MNIST);
  # with $TRAIN_SEEDS the found nets are then trained with the study's recipe (fbnas pareto, those seeds)
  # A $MODES entry two_path_a<K> is mode=two_path anchor_steps=K; SIDE_BY_SIDE=1 runs the searches at once
  # (their wall times then share the GPU and the host)
  local limit=${LIMIT:-0.685188261936183} tag=${TAG:-fmnist} m runs=()
  for m in $(echo "${MODES:-soft,two_path,hard}" | tr , ' '); do
    if [ "${SIDE_BY_SIDE:-0}" = 1 ]; then modes_search "$limit" "$tag" "$m" & else modes_search "$limit" "$tag" "$m"; fi
    runs+=("/tmp/modes/$tag/$m")
  done
  wait
  [ -z "${TRAIN_SEEDS:-}" ] && return
  local space=fmnist; [ -f "${runs[0]}/space.yaml" ] && space=${runs[0]}/space.yaml
  timeout "${TRAIN_TIMEOUT:-300}" python3 -m fbnas.cli pareto space=$space device=sd835 \
    "runs=[$(IFS=,; echo "${runs[*]}")]" baselines=[] "seeds=[$TRAIN_SEEDS]" workers=8 train.accelerator=cuda \
    train.epochs=3 train.fold_epochs=1 train.max_steps_per_epoch=80 train.batch_size=256 train.lr=0.1 \
    progress=false hydra.run.dir=/tmp/modes/$tag/pareto > "$OUT/modes_${tag}_pareto.log" 2>&1
  echo "pareto rc=$?"; mkdir -p "$OUT/modes_$tag"
  cp /tmp/modes/$tag/pareto/pareto.{md,json} "$OUT/modes_$tag/" 2>/dev/null
  tar czf "$OUT/modes_$tag.tgz" -C /tmp/modes "$tag" --exclude=checkpoints 2>/dev/null
  grep -E "^\| search" "$OUT/modes_$tag/pareto.md"
}

modes_search() {  # <limit ms> <tag> <mode[_a<anchor steps>]>
  local limit=$1 tag=$2 m=$3 epochs=6 t0 anchor=""
  [ "$m" = hard ] && epochs=8
  [[ "$m" == *_a* ]] && anchor="anchor_steps=${m##*_a}"
  t0=$(date +%s.%N)
  timeout "${SEARCH_TIMEOUT:-400}" python3 -m fbnas.cli search device=sd835 objective.kind=target \
    objective.limit_ms=$limit mode=${m%_a*} $anchor accelerator=cuda threads=1 progress=false epochs=$epochs \
    data.train_subset=16000 ${SPACE_ARGS:-} hydra.run.dir=/tmp/modes/$tag/$m > "$OUT/modes_${tag}_$m.log" 2>&1
  echo "$tag $m rc=$? epochs=$epochs wall_s=$(python3 -c "import time; print(round(time.time() - $t0, 1))")" \
    | tee -a "$OUT/modes.txt"
}

part_additivity() {
  timeout 150 python3 bench/lut_additivity.py --backend cuda --archs 50 --out "$OUT/lut_additivity_cuda.json" \
    > "$OUT/lut_additivity_cuda.txt" 2>&1; echo "graphs rc=$?"; tail -n 2 "$OUT/lut_additivity_cuda.txt"
  timeout 100 python3 bench/lut_additivity.py --backend cuda --archs 50 --graph-unroll 0 \
    --out "$OUT/lut_additivity_cuda_eager.json" > "$OUT/lut_additivity_cuda_eager.txt" 2>&1
  echo "eager rc=$?"; tail -n 2 "$OUT/lut_additivity_cuda_eager.txt"
}

part_hessian() {
  timeout 280 python3 bench/hessian.py --device cuda --batch-size 64 --batches 1 --max-probes "${HESS_PROBES:-256}" \
    --out "$OUT/hessian_speed" > "$OUT/hessian_speed.log" 2>&1; echo "hessian rc=$?"
  tail -n 14 "$OUT/hessian_speed.log"
  timeout 100 python3 bench/hvp_profile.py --device cuda --batch-size 64 > "$OUT/hvp_profile.txt" 2>&1
  echo "hvp_profile rc=$?"; head -n 30 "$OUT/hvp_profile.txt"
}

part_deploy() {
  rm -rf /tmp/fbnas_int
  timeout "${DEPLOY_TIMEOUT:-540}" python3 bench/int_deploy.py --device cuda --no-ort \
    ${DEPLOY_ARGS:---epochs 8 --fold-epochs 2 --steps 300 --w8-init fp32} \
    --runs /tmp/fbnas_int --out "$OUT/int_deploy.md" > "$OUT/int_deploy.log" 2>&1; echo "int_deploy rc=$?"
  tar czf "$OUT/int_runs.tgz" -C /tmp fbnas_int --exclude=checkpoints 2>/dev/null
  cat "$OUT/int_deploy.md" 2>/dev/null; tail -n 3 "$OUT/int_deploy.log"
}

part_ilp() {
  rm -rf /tmp/gs/gvi
  timeout 540 python3 bench/gumbel_vs_ilp.py --device cuda --epochs 5 --fold-epochs 1 --steps 250 --search-steps 120 \
    --runs /tmp/gs/gvi --out "$OUT/gumbel_vs_ilp.md" > "$OUT/gumbel_vs_ilp.log" 2>&1; echo "gumbel_vs_ilp rc=$?"
  cat "$OUT/gumbel_vs_ilp.md"; tail -n 3 "$OUT/gumbel_vs_ilp.log"
}

part_heff() {
  rm -rf /tmp/gs /tmp/heff; mkdir -p /tmp/gs /tmp/heff
  for seed in ${SEEDS:-0}; do
    for beta in ${BETAS:-default t0.046}; do
      for g in ${GAMMAS:-0 0.05 0.15}; do
        case $beta in default) b="";; t*) b="--latency-target ${beta#t}";; *) b="--beta $beta";; esac
        name=s${seed}_b${beta}_g$g
        timeout 540 python3 bench/hessian_search_effect.py --space fmnist_deep --fixed-op ir_k3_e3 --accelerator cuda \
          --threads 2 --gammas "$g" $b --seed "$seed" --epochs 6 --warmup-epochs 2 --steps 100 --batch-size 128 \
          --train-subset 16000 --runs "/tmp/gs/$name" --out "/tmp/heff/hessian_search_effect_bits_$name" \
          > "/tmp/heff/$name.log" 2>&1 &
      done
    done
  done
  wait
  for f in /tmp/heff/*.md; do echo "== $f"; grep -A 4 "^| gamma" "$f"; done | tee "$OUT/heff_summary.txt"
  tar czf "$OUT/heff.tgz" -C /tmp heff
}

part_sweep() {
  timeout 560 python3 -m fbnas.cli search -m accelerator=cuda "objective.beta=${BETAS:-0.0,0.6,1.5}" progress=false \
    hydra.sweep.dir=/tmp/sweep > "$OUT/sweep.log" 2>&1; echo "sweep rc=$?"
  python3 bench/summarize_runs.py /tmp/sweep | tee "$OUT/sweep_summary.txt"
}

part_platform() {
  rm -rf /tmp/gs; mkdir -p /tmp/gs
  for dev in sd835 bitfusion; do
    timeout 380 python3 -m fbnas.cli search accelerator=cuda device=$dev threads=2 progress=false \
      hydra.run.dir=/tmp/gs/$dev > /tmp/gs/$dev.log 2>&1 &
  done
  wait
  for d in sd835 bitfusion; do echo "== $d"; tail -n 9 /tmp/gs/$d.log; done | tee "$OUT/platform_searches.txt"
  tar czf "$OUT/platform_searches.tgz" -C /tmp gs --exclude=checkpoints 2>/dev/null
}

part_train() {
  rm -rf /tmp/tr; mkdir -p /tmp/tr
  for a in ${ARCHS:-bench/archs/fmnist__host_ort_int8.json bench/archs/fmnist__sd835_w8a8.json}; do
    name=$(basename "$a" .json)
    for q in true false; do
      timeout 540 python3 -m fbnas.cli train arch="$a" accelerator=cuda quantized=$q epochs=${EPOCHS:-15} \
        fold_epochs=${FOLD_EPOCHS:-3} hydra.run.dir=/tmp/tr/${name}_q$q > /tmp/tr/${name}_q$q.log 2>&1 &
    done
  done
  wait
  for d in /tmp/tr/*/; do
    n=$(basename "$d"); cp "$d/metrics.json" "$OUT/train_$n.json"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in m.items() if k.startswith('acc') or k.startswith('integer')})" "$d/metrics.json" "$n" 2>/dev/null
  done | tee "$OUT/train_summary.txt"
}

parts="step ddp modes pareto additivity hessian deploy ilp heff sweep platform train"
[ $# -ge 1 ] || { echo "usage: bash bench/gpu.sh <part>...; parts: $parts" >&2; exit 2; }
for part in "$@"; do
  [[ " $parts " == *" $part "* ]] || { echo "unknown part $part; parts: $parts" >&2; exit 2; }
done
prelude
if [ $# -eq 1 ]; then "part_$1"; exit; fi
for part in "$@"; do "part_$part" > "$OUT/part_$part.txt" 2>&1 & done  # several parts: side by side
wait
for part in "$@"; do echo "== $part"; tail -n 40 "$OUT/part_$part.txt"; done
