"""Pareto study: searched networks against random and hand-designed ones at equal device latency, every one
trained with the same recipe (`fbnas train`'s QAT, BN folding, integer-only evaluation) and several seeds."""
from .networks import Network, arch_id, handcrafted_networks, mbv2_reference_ms, random_networks
from .study import ParetoResult, run_pareto

__all__ = ["Network", "ParetoResult", "arch_id", "handcrafted_networks", "mbv2_reference_ms", "random_networks",
           "run_pareto"]
