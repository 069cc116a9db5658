"""Candidate blocks: one registry keyed by op name (ir_*, sqnxt_*, shuffle_*, skip).

Adding a block is one `register_op` call: a builder (c_in, c_out, stride, bit_state) -> nn.Module and a
kernel description (c_in, c_out, stride, h, w) -> list[KernelSpec].
"""
from .registry import OpDef, build_op, get_op, is_known_op, known_ops, op_kernels, register_op
from .kernels import KernelSpec
from . import mobilenet, squeezenext, shufflenet, skip  # noqa: F401  (register the built-in ops)

__all__ = ["OpDef", "KernelSpec", "build_op", "get_op", "is_known_op", "known_ops", "op_kernels", "register_op"]
