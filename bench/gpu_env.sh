# Sourced by the bench/gpu_*.sh scripts (device tool, repo root, carry .devwheels and .data): puts
# Fashion-MNIST where fbnas looks for it, installs the hydra/omegaconf wheels the GPU image lacks, sets the
# environment and $OUT, and records the GPU.
mkdir -p /usr/share/datasets && cp -r .data/fashion-mnist /usr/share/datasets/
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devwheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
