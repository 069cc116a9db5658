"""Candidate blocks: one registry keyed by op name (ir_*, sqnxt_*, shuffle_*, skip, ...).

Each block is one module file here that registers its ops with `register_op(OpDef(...))`: the nn.Module builder
(c_in, c_out, stride, bit_state), its fused-kernel description (c_in, c_out, stride, h, w) -> list[KernelSpec]
(latency, BOPs, size), its integer lowering onto `fbnas.quant.fold.ProgramBuilder`, and an optional shape check.
Every module of this package other than `registry` and `kernels` is imported below, so a new block is a new
file plus its op name in a search space's `candidates` (docs/extending.md).
"""
import importlib
import pkgutil

from .kernels import KernelSpec
from .registry import OpDef, build_op, get_op, is_known_op, known_ops, op_kernels, register_op

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in ("registry", "kernels"):
        importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["OpDef", "KernelSpec", "build_op", "get_op", "is_known_op", "known_ops", "op_kernels", "register_op"]
