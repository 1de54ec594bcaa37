"""Predictors by name: make_predictor for evaluation and tests, load_predictor for the runtime."""

from __future__ import annotations

from pathlib import Path

from .base import Predictor
from .baselines import OraclePredictor, PopularityPredictor, PreviousTokenPredictor
from .cross_layer import CrossLayerGatePredictor
from .eam import ActivationMatrixPredictor
from .learned import FILE_NAME, LearnedCorrection, LearnedCorrectionPredictor
from .routing import RouterParams
from .trace import Trace

PREDICTOR_NAMES = ("cross_layer", "cross_layer_raw", "learned", "previous", "popularity", "eam", "oracle")
PREDICTOR_DIR = "predictor"   # inside a model directory


def correction_path(model_dir: str | Path) -> Path:
    """Where a model's fitted learned correction lives."""
    return Path(model_dir) / PREDICTOR_DIR / FILE_NAME


def make_predictor(name: str, params: RouterParams | None = None, *, fit_trace: Trace | None = None,
                   replay_trace: Trace | None = None, model_dir: str | Path | None = None) -> Predictor:
    """A predictor by name.

    cross_layer, cross_layer_raw: ``params``. learned: ``params`` and a fitted
    correction from ``model_dir``. previous: ``params`` (or any trace, for the
    sizes). popularity, eam: ``fit_trace``. oracle: ``replay_trace``, the trace
    it will be replayed on.
    """
    if name in ("cross_layer", "cross_layer_raw"):
        return CrossLayerGatePredictor(_need(params, name, "params"), renorm=name == "cross_layer")
    if name == "learned":
        path = correction_path(_need(model_dir, name, "model_dir"))
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; fit it first (moe-offload fit-predictor --model ...)")
        return LearnedCorrectionPredictor(LearnedCorrection.load(path), _need(params, name, "params"))
    if name == "previous":
        sizes = params or fit_trace or replay_trace
        _need(sizes, name, "params or a trace")
        return PreviousTokenPredictor(sizes.num_layers, sizes.num_experts)
    if name == "popularity":
        return PopularityPredictor.fit(_need(fit_trace, name, "fit_trace"))
    if name == "eam":
        return ActivationMatrixPredictor.fit(_need(fit_trace, name, "fit_trace"))
    if name == "oracle":
        return OraclePredictor(_need(replay_trace, name, "replay_trace"))
    raise ValueError(f"unknown predictor {name!r}; known: {', '.join(PREDICTOR_NAMES)}")


def load_predictor(name: str, model_dir: str | Path, params: RouterParams) -> Predictor:
    """A runtime predictor for the model in ``model_dir``: cross_layer, cross_layer_raw, learned or previous."""
    if name in ("popularity", "eam", "oracle"):
        raise ValueError(f"predictor {name!r} is fitted on traces; use make_predictor with a trace")
    return make_predictor(name, params, model_dir=model_dir)


def _need(value, predictor: str, what: str):
    if value is None:
        raise ValueError(f"predictor {predictor!r} needs {what}")
    return value
