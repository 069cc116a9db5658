"""Hessian-aware quantization: per-group Hutchinson traces, HAWQ-V2 sensitivities, the search penalty."""
from .estimator import (GroupTrace, HessianConvergenceWarning, TraceResult, cross_entropy_loss, float_eval_mode,
                        hutchinson_traces)
from .groups import child_groups, group_weights, quantized_weights, supernet_groups
from .penalty import HessianPenalty, QuantErrorBank, supernet_traces
from .report import HESSIAN_FORMAT, hessian_record, load_hessian, write_hessian
from .sensitivity import omega, omega_table, quant_error

__all__ = ["GroupTrace", "HESSIAN_FORMAT", "HessianConvergenceWarning", "HessianPenalty", "QuantErrorBank",
           "TraceResult", "child_groups", "cross_entropy_loss", "float_eval_mode", "group_weights", "hessian_record",
           "hutchinson_traces", "load_hessian", "omega", "omega_table", "quant_error", "quantized_weights",
           "supernet_groups", "supernet_traces", "write_hessian"]
