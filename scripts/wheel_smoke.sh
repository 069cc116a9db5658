#!/usr/bin/env bash
# The wheel works outside the checkout: build it from the tracked files, install it (no dependencies) into a
# fresh virtualenv that sees .venv's packages (torch, timm, ... through a .pth line), then, from an unrelated
# temporary directory, predict a latency with the shipped table, run a tiny search, and build a user table
# (written to the user data directory, never into site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" "$tmp/dist" "$tmp/elsewhere"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$tmp/src"
$PY -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/dist" "$tmp/src"
$PY -m venv --without-pip "$tmp/venv"
deps=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$site/fbnas_ci_parent_site.pth"
$PY -m pip --python "$tmp/venv/bin/python" install -q --no-deps --no-index "$tmp"/dist/fbnas-*.whl
cd "$tmp/elsewhere"
export XDG_DATA_HOME="$tmp/xdg"  # where platformdirs puts user data (user-built tables)
chmod -R a-w "$site/fbnas"  # the installed package is read-only, as in a system or shared install
"$tmp/venv/bin/python" -c 'import fbnas, sys; assert fbnas.__file__.startswith(sys.argv[1]), fbnas.__file__' "$site"
printf 'ir_k3_e6 skip ir_k5_e3 skip ir_k3_e1 skip\n' > archs.txt
"$tmp/venv/bin/fbnas" lut predict space=fmnist device=sd835 archs=archs.txt
"$tmp/venv/bin/python" -m fbnas search epochs=1 warmup_epochs=0 max_steps_per_epoch=3 data.train_subset=512 data.batch_size=64 \
  data.test_subset=256 derive.eval_batches=1 derive.calibration_batches=1 progress=false hydra.run.dir=run
test -s run/arch.json && test -s run/search_ops.png
"$tmp/venv/bin/fbnas" info run/arch.json >/dev/null
"$tmp/venv/bin/fbnas" list spaces >/dev/null
"$tmp/venv/bin/fbnas" lut build space=fmnist device=a11 >/dev/null
test -s "$XDG_DATA_HOME/fbnas/latency_tables/fmnist__a11.json"
chmod -R u+w "$site/fbnas"
echo "wheel smoke: ok ($(ls "$tmp"/dist))"
