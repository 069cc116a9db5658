"""Export a finished `fbnas train` run as files a user can keep and deploy (`fbnas export`).

    arch          arch.json (fbnas-arch/1: rebuilds the network with fbnas.build_model)
    safetensors   model.safetensors (the run's weights: folded fake-quant model, or the FP32 model)
    pt2           torch.export program (dynamic batch): model_integer.pt2 for a quantized run -- the integer-only
                  model, whose outputs equal the folded fake-quant model's bit for bit (the fake-quant forward itself
                  has data-dependent range checks that torch.export cannot trace) -- or model_fp32.pt2 for an FP32 run
    onnx_fp32     model_fp32.onnx: the float network (BN folded) of the run's weights
    onnx_qdq      model_qdq.onnx: QuantizeLinear/DequantizeLinear form, int8 (int4/uint4 for <= 4-bit layers, opset 21)
    onnx_qlinear  model_qlinear.onnx: QLinearConv/QLinearAdd integer graph
                  Both quantized ONNX forms carry zero channels where onnxruntime's int8 kernels need them
                  (fbnas.quant.align; same logits bit for bit) unless align=False.
    card          model_card.md: architecture, bits, predicted latency/size/BOPs, accuracies, files and how to load
Every file is written atomically; the quantized formats need a quantized run; `all` (the default) is every format
the run has.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import torch

from ..arch import Arch, load_arch
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write_bytes, atomic_write_text, sha256_file

FORMATS = ("arch", "safetensors", "pt2", "onnx_fp32", "onnx_qdq", "onnx_qlinear", "card")
QUANTIZED_FORMATS = ("onnx_qdq", "onnx_qlinear")


class TrainRun:
    """The files of a finished training run, checked on open."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise ConfigError(f"{self.dir}: run directory not found (field 'run'); pass the directory of a "
                              "finished `fbnas train` run")
        for name in ("arch.json", "model.safetensors", "metrics.json"):
            if not (self.dir / name).is_file():
                raise ConfigError(f"{self.dir}: not a finished `fbnas train` run ({name} is missing); finish or "
                                  "resume the run (resume=true) first")
        self.arch: Arch = load_arch(self.dir / "arch.json")
        try:
            self.metrics: dict = json.loads((self.dir / "metrics.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{self.dir / 'metrics.json'}: malformed JSON at line {exc.lineno} "
                                  f"({exc.msg}); re-run the evaluation or restore the file") from None
        from .artifacts import read_state

        _, meta = read_state(self.dir / "model.safetensors")
        self.kind = meta.get("kind", "folded")
        if self.kind not in ("folded", "float"):
            raise CheckpointError(f"{self.dir / 'model.safetensors'}: holds a {self.kind!r} model; expected the "
                                  "final model of a `fbnas train` run")

    @property
    def quantized(self) -> bool:
        return self.kind == "folded"

    def folded(self):
        """The FoldedNet of the run (the float network BN-folded, for an FP32 run: no quantizer is used)."""
        from .artifacts import load_folded, load_unfolded
        from .fold import fold_model

        path = self.dir / "model.safetensors"
        if self.quantized:
            return load_folded(path, self.arch, str(self.dir / "arch.json"))
        return fold_model(load_unfolded(path, self.arch, str(self.dir / "arch.json"))).eval()

    def float_net(self):
        from .artifacts import load_unfolded

        return load_unfolded(self.dir / "model.safetensors", self.arch, str(self.dir / "arch.json"))


def _check_formats(formats: Sequence[str], run: TrainRun) -> list[str]:
    fmts = list(FORMATS) if not formats or list(formats) == ["all"] else [str(f) for f in formats]
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise ConfigError(f"field 'formats' has {bad[0]!r}; choose from {', '.join(FORMATS)} (or all)")
    if not run.quantized:
        quant = [f for f in fmts if f in QUANTIZED_FORMATS]
        if quant and formats and list(formats) != ["all"]:
            raise ConfigError(f"field 'formats': {quant[0]} needs a quantized run; {run.dir} was trained with "
                              "quantized=false")
        fmts = [f for f in fmts if f not in QUANTIZED_FORMATS]
    return fmts


def _save_pt2(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    from torch.export import Dim

    program = torch.export.export(module.eval(), (example,),
                                  dynamic_shapes=({0: Dim("batch", min=1, max=65536)},))
    buffer = io.BytesIO()  # a buffer, then one atomic write (torch warns about a temporary name not ending in .pt2)
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def export_run(run_dir: str | Path, out_dir: str | Path, formats: Sequence[str] = (),
               align: bool = True) -> dict[str, Path]:
    """Write the requested formats of a finished training run into out_dir; returns format -> path."""
    from .align import align_channels
    from .integer import to_integer
    from .onnx_graph import fp32_graph, qdq_graph, qlinear_graph, save_onnx

    run = TrainRun(run_dir)
    fmts = _check_formats(formats, run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = run.arch
    folded = run.folded()
    integer = to_integer(folded) if run.quantized else None
    onnx_integer = align_channels(integer)[0] if integer is not None and align else integer
    example = torch.zeros(2, arch.in_channels, arch.input_size, arch.input_size)
    written: dict[str, Path] = {}
    for fmt in fmts:
        if fmt == "arch":
            written[fmt] = out / "arch.json"
            arch.save(written[fmt])
        elif fmt == "safetensors":
            written[fmt] = out / "model.safetensors"
            atomic_write_bytes(written[fmt], (run.dir / "model.safetensors").read_bytes())
        elif fmt == "pt2":
            written[fmt] = out / ("model_integer.pt2" if run.quantized else "model_fp32.pt2")
            _save_pt2(integer if run.quantized else run.float_net(), example, written[fmt])
        elif fmt == "onnx_fp32":
            written[fmt] = out / "model_fp32.onnx"
            save_onnx(with_metadata(fp32_graph(folded), arch), written[fmt])
        elif fmt == "onnx_qdq":
            written[fmt] = out / "model_qdq.onnx"
            save_onnx(with_metadata(qdq_graph(onnx_integer), arch), written[fmt])
        elif fmt == "onnx_qlinear":
            written[fmt] = out / "model_qlinear.onnx"
            save_onnx(with_metadata(qlinear_graph(onnx_integer), arch), written[fmt])
    if "card" in fmts:
        written["card"] = out / "model_card.md"
        atomic_write_text(written["card"], model_card(run, {k: v for k, v in written.items() if k != "card"}))
    return written


def onnx_metadata(arch: Arch) -> dict[str, str]:
    """ONNX metadata_props: the input the model expects and its class names (JSON values), from arch.json."""
    pre = arch.preprocessing
    meta = {"input_layout": pre.get("layout", "NCHW"),
            "input_shape": json.dumps(["N", arch.in_channels, arch.input_size, arch.input_size]),
            "fbnas_space": arch.space, "fbnas_preprocessing": json.dumps(pre)}
    for key in ("classes", "mean", "std", "formula"):
        if key in pre:
            meta[key] = pre[key] if isinstance(pre[key], str) else json.dumps(pre[key])
    return meta


def with_metadata(model, arch: Arch):
    import onnx

    onnx.helper.set_model_props(model, onnx_metadata(arch))
    return model


def _input_lines(arch: Arch) -> list[str]:
    pre = arch.preprocessing
    lines = ["## Input and classes", "",
             f"- input: float32 {pre.get('layout', 'NCHW')} (N, {arch.in_channels}, {arch.input_size}, "
             f"{arch.input_size}), name `input`"]
    if "mean" in pre:
        lines.append(f"- {pre.get('pixels', 'pixels')} in [0, 255] -> {pre['formula']}, mean {pre['mean']}, "
                     f"std {pre['std']} (dataset {pre.get('dataset', '?')})")
    elif "formula" in pre:
        lines.append(f"- preprocessing: {pre['formula']} (dataset {pre.get('dataset', '?')})")
    else:
        lines.append("- preprocessing: not recorded in arch.json (trained before fbnas stored it)")
    if "classes" in pre:
        lines.append("- classes (output index: name): " + ", ".join(f"{i}: {c}" for i, c in enumerate(pre["classes"])))
    lines.append("- the ONNX files carry the same as metadata_props (classes, mean, std, input_layout, input_shape)")
    return lines + [""]


def model_card(run: TrainRun, files: dict[str, Path]) -> str:
    """A short markdown card: architecture and bits, predicted costs (arch.json), accuracies (metrics.json)."""
    arch, m = run.arch, run.metrics
    lines = [f"# fbnas model: {arch.space} child, {'quantized (integer-only deployable)' if run.quantized else 'FP32'}",
             "", f"Trained run: `{run.dir}`", "", "## Architecture", "",
             f"input {arch.in_channels}x{arch.input_size}x{arch.input_size}, {arch.num_classes} classes; stem "
             f"conv{arch.stem_kernel} {arch.stem_channels} ch stride {arch.stem_stride}; head {arch.head_channels} ch; "
             f"stem/head/classifier at w{arch.fixed_w_bits}a{arch.fixed_a_bits}", "",
             "| layer | op | channels | stride | w bits | a bits |", "|---:|---|---|---:|---:|---:|"]
    lines += [f"| {i} | {l.op} | {l.c_in} -> {l.channels} | {l.stride} | {l.w_bits} | {l.a_bits} |"
              for i, l in enumerate(arch.layers)]
    lines += [""] + _input_lines(arch) + ["## Predicted cost", "", f"- size {arch.size_kb():.1f} KB (weights at their bits, 32-bit biases), "
              f"{arch.bops() / 1e9:.4f} G BOPs, {arch.macs() / 1e6:.2f} M MACs"]
    for dev, rec in sorted(arch.predicted.items()):
        if isinstance(rec, dict) and "latency_ms" in rec:
            lines.append(f"- latency on {dev}: {rec['latency_ms']:.4g} ms ({rec.get('source', 'lut')}, from arch.json)")
    lines += ["", "## Accuracy (test set, top-1 %, from metrics.json)", ""]
    labels = {"acc_float": "FP32", "acc_float_of_qat_weights": "QAT weights without quantization",
              "acc_fake_quant_bn": "fake quant, float BN (before folding)", "acc_fake_quant": "folded fake quant",
              "acc_integer": "integer-only", "integer_vs_fake_top1_disagreements": "integer vs fake-quant "
              "top-1 disagreements"}
    lines += [f"- {label}: {m[k]}" for k, label in labels.items() if k in m]
    lines += ["", "## Files", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| {p.name} | `{sha256_file(p)[:16]}...` |" for p in files.values()]
    lines += ["", "## Loading", "", "```python",
              "from fbnas import load_arch, build_model            # rebuild from arch.json + model.safetensors",
              "from fbnas.quant.artifacts import load_folded       # quantized run: the folded fake-quant model",
              "import torch; prog = torch.export.load('model_integer.pt2'); logits = prog.module()(images)",
              "import onnxruntime as ort; sess = ort.InferenceSession('model_qdq.onnx'); sess.run(None, {'input': x})",
              "```", "Inputs are normalised images as in 'Input and classes' above."]
    return "\n".join(lines) + "\n"
