#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): the Fashion-MNIST package, a virtualenv in .venv,
# and fbnas installed editable with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import fbnas, pytest, onnxruntime" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[test]"
fi
