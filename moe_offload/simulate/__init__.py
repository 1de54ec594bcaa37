"""Offline analysis: replay routing traces through the runtime's call protocol (the simulator), the
per-layer miss curves the 'dp' allocation needs, and budget sweeps."""

from .calls import RouterCall, RoutingArrays, call_spans, router_calls
from .link import SimulatedLink
from .miss_curves import lru_miss_curves
from .simulator import SimulationResult, Simulator

__all__ = ["RouterCall", "RoutingArrays", "SimulatedLink", "SimulationResult", "Simulator", "call_spans",
           "lru_miss_curves", "router_calls"]
