"""The whole-cluster simulator: the real engine model, routing policies and autoscaling hook,
run in virtual time (see cluster.py)."""

from loadtest.simulator.cluster import (
    AutoscalingHook,
    AutoscalingMetrics,
    FleetSpec,
    SimulationResult,
    resolve,
    simulate,
)
from loadtest.simulator.ideal import IdealPrefixCache

__all__ = [
    "AutoscalingHook",
    "AutoscalingMetrics",
    "FleetSpec",
    "IdealPrefixCache",
    "SimulationResult",
    "resolve",
    "simulate",
]
