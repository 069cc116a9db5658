"""Measured int8 device: this CPU running the exported integer graphs (what `fbnas export` writes: QDQ, channel
aligned) in onnxruntime.

An int8 op cannot be timed as a standalone micro-model: onnxruntime fuses each Q/DQ pattern into QLinearConv &c.
together with its neighbours, runs the graph in NHWC and drops the transposes between int8 ops, so a micro-model
pays layout changes and quantizers that the same op inside a network does not. Its profiler cannot split a
network's time either: at batch 1 its per-node bookkeeping is larger than the kernels (profiled node times add up
to ~3x the unprofiled run).

So ops are timed by difference, in context. A base network (`skip` in every layer, or the candidate with the
fewest MACs, at the space's highest bits) is timed once; for every layer i, op X and bits, the network with
layer i replaced by X is run alternately with the base, and X costs base_i plus the median of the paired
differences wall(with X) - wall(base) there (pairs cancel slow spells of the machine).
base_i, like the stem, head, pool and classifier, is the base network's unprofiled wall time split over its
parts in proportion to their profiled kernel times. A key used by several layers keeps the median. Differences
are what the search's latency term sees (a constant per layer does not move it); sums of entries predict the
whole network's wall time, with neighbour interactions those of the base network. Weights are random with
calibrated ranges: int8 kernel time does not depend on their values.
"""
from __future__ import annotations

import bisect
import json
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..arch import Arch
from ..errors import ConfigError
from ..quant.onnx_graph import ort_session
from .devices import Device, DeviceModel, register_device_type
from .keys import OpSignature, arch_signatures
from .measured import Stats, backend_versions

_PART_RE = re.compile(r"^(?:(?P<layer>layers\.\d+)|(?P<stem>stem|input)|head\.(?P<head>conv|pool|classifier))[.:_]")
_HEAD_PARTS = {"conv": "head", "pool": "pool", "classifier": "classifier"}


@dataclass(frozen=True)
class OrtInt8Params:
    warmup: int = 20     # untimed runs before timing
    repeats: int = 100   # timed runs of each network (and of the base beside it)
    batch: int = 1


def calibrated_random_network(arch: Arch, seed: int = 0, calib_batch: int = 32):
    """The FoldedNet of `arch` with random weights, BN statistics and activation ranges from random inputs
    (so that activations stay O(1) through depth): enough to time integer kernels, which ignore values."""
    from ..model import build_model
    from ..quant.fold import fold_model

    torch.manual_seed(seed)
    net = build_model(arch)
    x = torch.randn(calib_batch, arch.in_channels, arch.input_size, arch.input_size)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        net.train()(x)
        folded = fold_model(net.eval())
        folded.calibrate([x[: calib_batch // 2], x[calib_batch // 2:]])
    return folded.eval()


def int8_graph(arch: Arch, seed: int = 0):
    """The int8 ONNX graph that `fbnas export` writes for `arch` (QDQ, channel aligned), random weights."""
    from ..quant.align import align_channels
    from ..quant.integer import to_integer
    from ..quant.onnx_graph import qdq_graph

    aligned, _ = align_channels(to_integer(calibrated_random_network(arch, seed)))
    return qdq_graph(aligned)


def part_of(node_name: str) -> Optional[str]:
    """The network part an exported node name belongs to (stem, layers.<i>, head, pool, classifier), or None."""
    m = _PART_RE.match(node_name + "_")
    if m is None:
        return None
    if m["layer"]:
        return m["layer"]
    return "stem" if m["stem"] else _HEAD_PARTS[m["head"]]


def node_parts(optimized_model) -> dict[str, str]:
    """Node name -> part for every node of onnxruntime's optimized graph; a node it inserted (a Transpose, a
    reorder) belongs to the part that produces its input, or to the stem when it reads the graph input."""
    producer: dict[str, str] = {}
    out: dict[str, str] = {}
    for node in optimized_model.graph.node:  # topological order
        part = part_of(node.name)
        if part is None:
            parents = [producer[t] for t in node.input if t in producer]
            part = parents[0] if parents else "stem"
        out[node.name] = part
        for t in node.output:
            producer[t] = part
    return out


def _feed(model, batch: int, seed: int = 0) -> dict:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = (batch,) + tuple(int(d.dim_value) for d in dims[1:])
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def time_interleaved(models: list, batch: int, threads: int, warmup: int, repeats: int) -> list[Stats]:
    """Wall time (ms) of each model, runs interleaved round-robin so that drift and background load hit all
    alike."""
    return [Stats.of(t) for t in run_interleaved(models, batch, threads, warmup, repeats)]


def run_interleaved(models: list, batch: int, threads: int, warmup: int, repeats: int) -> list[list[float]]:
    """The wall time (ms) of every timed run of each model, runs interleaved round-robin."""
    sessions = [ort_session(m, threads) for m in models]
    feeds = [_feed(m, batch) for m in models]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for s, f, t in zip(sessions, feeds, times):
            t0 = time.perf_counter_ns()
            s.run(None, f)
            t.append((time.perf_counter_ns() - t0) / 1e6)
    return times


def profiled_kernel_ms(model, batch: int, threads: int, warmup: int, repeats: int) -> dict[str, float]:
    """{part: median over runs of the summed kernel times of its nodes} from onnxruntime's profiler."""
    import onnx

    feed = _feed(model, batch)
    with tempfile.TemporaryDirectory(prefix="fbnas_int8_") as tmp:
        opt_path = str(Path(tmp) / "optimized.onnx")
        sess = ort_session(model, threads, profile_prefix=str(Path(tmp) / "profile"), optimized_path=opt_path)
        parts = node_parts(onnx.load(opt_path))
        for _ in range(warmup + repeats):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[-repeats:]
    starts = [r[0] for r in runs]
    per_run: dict[str, np.ndarray] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue  # a warm-up run
        node = name[: -len("_kernel_time")]
        if node not in parts:
            raise ConfigError(f"onnxruntime profile names node {node!r}, which is not in its optimized graph")
        per_run.setdefault(parts[node], np.zeros(len(runs)))[i] += e["dur"] / 1e3
    return {p: float(np.median(v)) for p, v in per_run.items()}


def split_wall(wall_ms: float, kernel_ms: dict[str, float]) -> dict[str, float]:
    """The wall time split over parts in proportion to their profiled kernel times."""
    total = sum(kernel_ms.values())
    return {p: wall_ms * v / total for p, v in kernel_ms.items()} if total > 0 else {}


def _combine(stats: list[Stats]) -> Stats:
    return Stats(statistics.median(s.p10 for s in stats), statistics.median(s.p50 for s in stats),
                 statistics.median(s.p90 for s in stats), sum(s.n for s in stats))


def _shift(s: Stats, by: float) -> Stats:
    return Stats(max(s.p10 + by, 0.0), max(s.p50 + by, 0.0), max(s.p90 + by, 0.0), s.n)


class OrtInt8Device(DeviceModel):
    analytic = False

    def __init__(self, device: Device):
        self.device = device
        self.p: OrtInt8Params = device.params

    def _reps(self, warmup: Optional[int], repeats: Optional[int]) -> tuple[int, int]:
        return (self.p.warmup if warmup is None else warmup), (self.p.repeats if repeats is None else repeats)

    def time_archs(self, archs: list[Arch], warmup: Optional[int] = None, repeats: Optional[int] = None
                   ) -> list[Stats]:
        """Wall time of the int8 network of each arch on this machine (interleaved)."""
        w, r = self._reps(warmup, repeats)
        return time_interleaved([int8_graph(a) for a in archs], self.p.batch, self.device.threads, w, r)

    def base_arch(self, space) -> Arch:
        n = len(space.layers())
        if "skip" in space.candidates:
            ops = ["skip"] * n
        else:
            ops = [min(space.candidates, key=lambda op: Arch.from_space(space, [op] * n, 8, 8).macs())] * n
        return Arch.from_space(space, ops, max(space.w_bits), max(space.a_bits))

    def build_table(self, space, signatures: dict[str, OpSignature], device: Device, warmup: Optional[int] = None,
                    repeats: Optional[int] = None, progress: Optional[Callable[[int, int, str], None]] = None):
        from .builder import signature_costs
        from .table import Entry, LatencyTable

        w, r = self._reps(warmup, repeats)
        base = self.base_arch(space)
        base_graph = int8_graph(base)
        base_runs = run_interleaved([base_graph], self.p.batch, self.device.threads, w, r)[0]
        diffs: list[tuple[str, str, Stats]] = []  # (key, part, paired difference to the base)
        variants = [(i, op, wb, ab) for i in range(len(base.layers)) for op in space.candidates
                    for wb in space.w_bits for ab in space.a_bits]
        for n, (i, op, wb, ab) in enumerate(variants):
            layers = list(base.layers)
            layers[i] = replace(layers[i], op=op, w_bits=wb, a_bits=ab)
            if layers[i] == base.layers[i]:
                continue  # the base network's own layer: its share of the base
            arch = replace(base, layers=tuple(layers))
            base_t, with_t = run_interleaved([base_graph, int8_graph(arch)], self.p.batch, self.device.threads, w, r)
            base_runs += base_t
            diff = Stats.of([b - a for a, b in zip(base_t, with_t)])  # paired: a slow spell hits both runs
            diffs.append((dict(arch_signatures(arch))[f"layers.{i}"].key, f"layers.{i}", diff))
            if progress:
                progress(n + 1, len(variants), f"layers.{i} {op} w{wb}a{ab}: {diff.p50:+.4f} ms")
        base_wall = Stats.of(base_runs)  # every base run of the build
        base_ms = split_wall(base_wall.p50, profiled_kernel_ms(base_graph, self.p.batch, self.device.threads, w, r))
        measured: dict[str, list[Stats]] = {}
        for part, sig in arch_signatures(base):
            ms = base_ms.get(part, 0.0)
            measured.setdefault(sig.key, []).append(Stats(ms, ms, ms, base_wall.n))
        for key, part, diff in diffs:
            measured.setdefault(key, []).append(_shift(diff, base_ms.get(part, 0.0)))
        missing = sorted(set(signatures) - set(measured))
        if missing:
            raise ConfigError(f"the int8 networks of space {space.name} do not cover {len(missing)} keys, e.g. "
                              f"{missing[0]!r}")
        entries = {}
        for key, sig in signatures.items():
            s = _combine(measured[key])
            macs, nbytes = signature_costs(sig)
            entries[key] = Entry(s.p50, s.p10, s.p90, s.n, macs, nbytes)
        return LatencyTable(
            device=device.name, source="measured", entries=entries, threads=device.threads, space=space.name,
            backend={"name": "ort_int8", "versions": backend_versions("ort")},
            calibration={"notes": "int8 QDQ graphs as `fbnas export` writes them, timed whole in onnxruntime: each "
                                  "layer variant as the median paired difference to a base network (alternate runs), the "
                                  "base (all its runs) split over its parts by profiled kernel time; median over "
                                  "layers sharing a key",
                         "warmup": w, "repeats": r, "batch": self.p.batch,
                         "base_arch": [f"{l.op} w{l.w_bits}a{l.a_bits}" for l in base.layers],
                         "base_wall_ms_p50": round(base_wall.p50, 4),
                         "networks_timed": 1 + len(diffs)},
            device_config=device.to_dict())


register_device_type("ort_int8", OrtInt8Params, OrtInt8Device, analytic=False,
                     doc="this machine's CPU running the exported int8 (QDQ) graphs in onnxruntime, ops timed in context")
