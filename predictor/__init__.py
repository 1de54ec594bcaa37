"""Expert predictors and routing traces (moe_offload.predictor)."""

from .trace import TRACE_VERSION, Trace, TraceFormatError

__all__ = ["TRACE_VERSION", "Trace", "TraceFormatError"]
