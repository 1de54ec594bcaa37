"""Expert predictors, routing traces and prediction metrics (moe_offload.predictor)."""

from .base import Predictor
from .baselines import OraclePredictor, PopularityPredictor, PreviousTokenPredictor
from .cross_layer import CrossLayerGatePredictor
from .eam import ActivationMatrixPredictor
from .fit_correction import CorrectionFitConfig, fit_correction
from .learned import (
    CorrectionFormatError,
    LearnedCorrection,
    LearnedCorrectionPredictor,
)
from .metrics import RecallCounter, chance_recall, recall, topk_hits
from .registry import (
    NO_PREDICTOR,
    PREDICTOR_NAMES,
    PREDICTORS,
    RUNTIME_PREDICTORS,
    PredictorEntry,
    correction_path,
    load_predictor,
    make_predictor,
    predictor_entry,
)
from .replay import replay
from .routing import RouterParams, cross_layer_input, router_logits, selection_scores
from .trace import TRACE_VERSION, Trace, TraceFormatError

__all__ = [
    "ActivationMatrixPredictor", "CorrectionFitConfig", "CorrectionFormatError", "CrossLayerGatePredictor",
    "LearnedCorrection", "LearnedCorrectionPredictor", "NO_PREDICTOR", "OraclePredictor", "PREDICTORS",
    "PREDICTOR_NAMES", "PopularityPredictor", "Predictor", "PredictorEntry", "PreviousTokenPredictor",
    "RUNTIME_PREDICTORS", "RecallCounter", "RouterParams",
    "TRACE_VERSION", "Trace", "TraceFormatError", "chance_recall", "correction_path", "cross_layer_input",
    "fit_correction", "load_predictor", "make_predictor", "predictor_entry", "recall", "replay", "router_logits",
    "selection_scores", "topk_hits",
]
