"""Hessian-aware quantization: per-group Hutchinson traces, HAWQ-V2 sensitivities, the search penalty."""
from .estimator import (HessianConvergenceWarning, GroupTrace, TraceResult, cross_entropy_loss, float_eval_mode,
                        hutchinson_traces)
from .penalty import HessianPenalty, QuantErrorBank, supernet_traces
from .groups import child_groups, group_weights, quantized_weights, supernet_groups
from .sensitivity import omega, omega_table, quant_error

__all__ = ["GroupTrace", "HessianConvergenceWarning", "HessianPenalty", "QuantErrorBank", "supernet_traces", "TraceResult", "child_groups", "cross_entropy_loss",
           "float_eval_mode", "group_weights", "hutchinson_traces", "omega", "omega_table", "quant_error",
           "quantized_weights", "supernet_groups"]
