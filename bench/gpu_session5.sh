#!/usr/bin/env bash
# Fifth GPU session (device tool, repo root, carry .devwheels and .data). Part:
#   deploy: QAT W8A8 and FP32 training of found Fashion-MNIST architectures ($ARCHS: arch.json files), side by
#           side on one GPU; metrics.json of each (float, fake-quant, integer-only accuracy) into $OUT
set -u
part=${1:-deploy}
source bench/gpu_env.sh
if [ "$part" = deploy ]; then
  rm -rf /tmp/tr; mkdir -p /tmp/tr
  for a in ${ARCHS:-bench/archs/fmnist__host_ort_int8.json bench/archs/fmnist__sd835_w8a8.json}; do
    name=$(basename "$a" .json)
    for q in true false; do
      timeout 540 python3 -m fbnas.cli train arch="$a" accelerator=cuda quantized=$q epochs=${EPOCHS:-15} \
        fold_epochs=${FOLD_EPOCHS:-3} hydra.run.dir=/tmp/tr/${name}_q$q > /tmp/tr/${name}_q$q.log 2>&1 &
    done
  done
  wait
  for f in /tmp/tr/*.log; do echo "== $f"; tail -n 2 "$f"; done
  for d in /tmp/tr/*/; do
    n=$(basename "$d"); cp "$d/metrics.json" "$OUT/train_$n.json"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[2], {k: v for k, v in m.items() if k.startswith('acc') or k.startswith('integer')})" "$d/metrics.json" "$n" 2>/dev/null
  done | tee "$OUT/deploy_summary.txt"
fi
