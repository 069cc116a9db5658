"""int8 ONNX vs fp32 ONNX of the same architecture in onnxruntime (CPU): p50 latency per model and the ratio.

For each architecture (a Fashion-MNIST child and a bigger fbnet_cifar100 child, W8A8 unless --bits) the folded
network is exported four ways (fbnas.quant.onnx_graph): fp32 (BN folded), qdq (Q/DQ around float ops, which
onnxruntime fuses into QLinearConv etc.) as is and channel-aligned (fbnas.quant.align: what `fbnas export` writes),
and qlinear (QLinearConv/QLinearAdd/MatMulInteger graph), channel-aligned. All run with
every onnxruntime graph optimisation, `--threads` intra-op threads (default 1), warm-up, then `--repeats`
timed runs per model, interleaved round-robin so that load on a shared machine hits all models alike.
Weights are random (timing does not depend on their values) unless --weights gives a trained model.safetensors.

    python bench/onnx_int8_speed.py                                   # both archs, batch 1 and 32
    python bench/onnx_int8_speed.py --repeats 20 --batches 1 --archs fmnist   # smoke
    python bench/onnx_int8_speed.py --archs runs/.../arch.json,fmnist          # a found architecture (its bits
                                                                              # are kept unless --bits)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fbnas import Arch, load_space
from fbnas.arch import load_arch
from fbnas.io import atomic_write_text
from fbnas.latency.measured import _cpu_name
from fbnas.latency.measured_int8 import calibrated_random_network, time_interleaved
from fbnas.quant.align import align_channels
from fbnas.quant.integer import to_integer
from fbnas.quant.onnx_graph import fp32_graph, qdq_graph, qlinear_graph

ARCHS = {  # name: (space, ops per layer)
    "fmnist": ("fmnist", "ir_k3_e1,ir_k3_e3,shuffle_k3,sqnxt_k3,ir_k3_e3,ir_k3_e3"),
    "fmnist28": ("fmnist28", "ir_k3_e1,ir_k3_e3,shuffle_k3,sqnxt_k3,ir_k3_e3,ir_k3_e3"),  # bench/int_deploy.py's child
    "fmnist_sd835": ("fmnist", "skip,ir_k3_e6,skip,ir_k3_e6,skip,ir_k5_e3"),  # default search, device=sd835
    "fbnet_cifar100": ("fbnet_cifar100",
                       ",".join(["ir_k3_e1"] + ["ir_k3_e6", "ir_k5_e3", "ir_k3_e3", "ir_k5_e6"] * 5 + ["ir_k3_e6"])),
}


def build_models(name: str, bits: int | None, weights: str = "") -> tuple[Arch, dict]:
    """fp32 / qdq / qlinear ONNX models of one architecture: a key of ARCHS or an arch.json path (random weights
    with calibrated ranges), or trained weights."""
    if weights:
        from fbnas.quant.artifacts import load_folded

        folded = load_folded(weights)
        arch = folded.arch
    else:
        if name.endswith(".json"):
            arch = load_arch(name)
            arch = arch if bits is None else arch.with_bits(bits, bits)
        else:
            space, ops = ARCHS[name]
            arch = Arch.from_space(load_space(space), ops.split(","), bits or 8, bits or 8)
        folded = calibrated_random_network(arch)
    folded.eval()
    integer = to_integer(folded)
    aligned, _ = align_channels(integer)
    return arch, {"fp32": fp32_graph(folded), "qdq": qdq_graph(integer), "qdq_aligned": qdq_graph(aligned),
                  "qlinear_aligned": qlinear_graph(aligned)}


def time_models(models: dict, batch: int, threads: int, warmup: int, repeats: int) -> dict:
    """{name: Stats (ms)} of each model, runs interleaved round-robin (background load hits every model alike)."""
    return dict(zip(models, time_interleaved(list(models.values()), batch, threads, warmup, repeats)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="fmnist,fbnet_cifar100", help="comma list of keys of ARCHS or arch.json paths")
    ap.add_argument("--bits", type=int, default=None, help="W/A bits of every layer (default: 8; an arch.json's own)")
    ap.add_argument("--weights", default="", help="trained model.safetensors (fmnist arch only)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default="bench/results/onnx_int8_speed/local.md")
    a = ap.parse_args()
    import onnxruntime

    lines = [f"# int8 ONNX vs fp32 ONNX in onnxruntime {onnxruntime.__version__} (CPU)", "",
             f"{_cpu_name()}, {a.threads} intra-op thread(s), all graph optimisations, "
             f"{a.warmup} warm-up + {a.repeats} timed runs per model (interleaved), p50 [p10, p90] ms; "
             f"{'W8A8 presets' if a.bits is None else f'W{a.bits}A{a.bits}'}, "
             f"{'trained weights ' + a.weights if a.weights else 'random weights'}", "",
             "| arch | batch | fp32 | int8 qdq | int8 qdq aligned | int8 qlinear aligned | fp32 / qdq | "
             "fp32 / qdq aligned | fp32 / qlinear aligned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in a.archs.split(","):
        arch, models = build_models(name, a.bits, a.weights if name == "fmnist" else "")
        label = name
        if name.endswith(".json"):  # a found architecture: its ops and bits
            label = f"{name}: " + ", ".join(f"{l.op} w{l.w_bits}a{l.a_bits}" for l in arch.layers)
        for batch in (int(b) for b in a.batches.split(",")):
            r = time_models(models, batch, a.threads, a.warmup, a.repeats)
            cell = {k: f"{v.p50:.3f} [{v.p10:.3f}, {v.p90:.3f}]" for k, v in r.items()}
            int8 = ("qdq", "qdq_aligned", "qlinear_aligned")
            lines.append(f"| {label} ({arch.macs() / 1e6:.1f} M MACs) | {batch} | {cell['fp32']} | "
                         + " | ".join(cell[k] for k in int8) + " | "
                         + " | ".join(f"{r['fp32'].p50 / r[k].p50:.2f}x" for k in int8) + " |")
            print(lines[-1], flush=True)
    lines += ["", "Ratios > 1 mean the int8 model is faster. Command: `python bench/onnx_int8_speed.py "
                  f"--archs {a.archs} --batches {a.batches} --threads {a.threads} --repeats {a.repeats}`"]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
