"""Predictors by name: one table says what each needs; make_predictor for evaluation and tests,
load_predictor for the runtime. Adding a predictor is its file and one PREDICTORS line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import Predictor
from .baselines import OraclePredictor, PopularityPredictor, PreviousTokenPredictor, RecallOraclePredictor
from .cross_layer import CrossLayerGatePredictor
from .eam import ActivationMatrixPredictor
from .learned import FILE_NAME, LearnedCorrection, LearnedCorrectionPredictor
from .routing import RouterParams
from .trace import Trace

PREDICTOR_DIR = "predictor"   # inside a model directory
NO_PREDICTOR = "none"         # the runtime's name for no prefetch


@dataclass(frozen=True)
class PredictorInputs:
    """What a factory may use; the entry's ``needs_*`` say which are checked to be present."""

    params: RouterParams | None = None
    fit_trace: Trace | None = None
    replay_trace: Trace | None = None
    model_dir: Path | None = None


@dataclass(frozen=True)
class PredictorEntry:
    """One predictor name: how to make it and what it needs."""

    factory: Callable[[PredictorInputs], Predictor]
    needs_gate_inputs: bool = False    # observes each layer's gate input: a replayed trace needs gate_inputs
    needs_router_params: bool = False  # the model's RouterParams
    needs_fit_trace: bool = False      # fitted on a trace: in-sample when replayed on that same trace
    needs_replay_trace: bool = False   # the trace it is replayed on (an oracle: it reads the future)
    needs_file: bool = False           # a fitted file in the model directory (learned: correction_path)
    runtime: bool = False              # usable by the runtime (OffloadConfig.predictor, load_predictor)

    def __post_init__(self) -> None:
        if self.runtime and (self.needs_fit_trace or self.needs_replay_trace):
            raise ValueError("a runtime predictor cannot need a trace")

    @property
    def why_trace_only(self) -> str:
        """Why the runtime cannot use it, as a phrase after the name ('' for runtime predictors)."""
        if self.runtime:
            return ""
        if self.needs_replay_trace:
            return "needs the future routing (the trace it is replayed on)"
        if self.needs_fit_trace:
            return "is fitted on a routing trace"
        return "is not usable by the runtime"


def correction_path(model_dir: str | Path) -> Path:
    """Where a model's fitted learned correction lives."""
    return Path(model_dir) / PREDICTOR_DIR / FILE_NAME


def _learned(inputs: PredictorInputs) -> Predictor:
    path = correction_path(inputs.model_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; fit it first (moe-offload fit-predictor --model ...)")
    return LearnedCorrectionPredictor(LearnedCorrection.load(path), inputs.params)


def _previous(inputs: PredictorInputs) -> Predictor:
    sizes = inputs.params or inputs.fit_trace or inputs.replay_trace
    if sizes is None:
        raise ValueError("predictor 'previous' needs params or a trace")
    return PreviousTokenPredictor(sizes.num_layers, sizes.num_experts)


PREDICTORS: dict[str, PredictorEntry] = {
    "cross_layer": PredictorEntry(lambda i: CrossLayerGatePredictor(i.params, renorm=True), needs_gate_inputs=True,
                                  needs_router_params=True, runtime=True),
    "cross_layer_raw": PredictorEntry(lambda i: CrossLayerGatePredictor(i.params, renorm=False),
                                      needs_gate_inputs=True, needs_router_params=True, runtime=True),
    "learned": PredictorEntry(_learned, needs_gate_inputs=True, needs_router_params=True, needs_file=True,
                              runtime=True),
    "previous": PredictorEntry(_previous, runtime=True),
    "popularity": PredictorEntry(lambda i: PopularityPredictor.fit(i.fit_trace), needs_fit_trace=True),
    "eam": PredictorEntry(lambda i: ActivationMatrixPredictor.fit(i.fit_trace), needs_fit_trace=True),
    "oracle": PredictorEntry(lambda i: OraclePredictor(i.replay_trace), needs_replay_trace=True),
}
PREDICTOR_NAMES = tuple(PREDICTORS)
RUNTIME_PREDICTORS = (NO_PREDICTOR, *(name for name, entry in PREDICTORS.items() if entry.runtime))


def predictor_entry(name: str) -> PredictorEntry:
    """The entry of ``name`` (a PREDICTORS name, or ``oracle@R`` for the oracle kept at recall R in [0, 1]);
    ValueError naming the known predictors otherwise."""
    if name in PREDICTORS:
        return PREDICTORS[name]
    recall = _oracle_recall(name)
    if recall is None:
        raise ValueError(f"unknown predictor {name!r}; known: {', '.join(PREDICTOR_NAMES)}, or oracle@R "
                         "(R in [0, 1])")
    return PredictorEntry(lambda i: RecallOraclePredictor(i.replay_trace, recall), needs_replay_trace=True)


def _oracle_recall(name: str) -> float | None:
    """R of a name ``oracle@R``, or None."""
    prefix, _, value = str(name).partition("@")
    if prefix != "oracle" or not value:
        return None
    try:
        recall = float(value)
    except ValueError:
        return None
    return recall if 0.0 <= recall <= 1.0 else None


def make_predictor(name: str, params: RouterParams | None = None, *, fit_trace: Trace | None = None,
                   replay_trace: Trace | None = None, model_dir: str | Path | None = None) -> Predictor:
    """A predictor by name, from the inputs its PREDICTORS entry needs.

    cross_layer, cross_layer_raw: ``params``. learned: ``params`` and a fitted
    correction from ``model_dir``. previous: ``params`` (or any trace, for the
    sizes). popularity, eam: ``fit_trace``. oracle: ``replay_trace``, the trace
    it will be replayed on.
    """
    entry = predictor_entry(name)
    needed = ((entry.needs_router_params, params, "params"), (entry.needs_fit_trace, fit_trace, "fit_trace"),
              (entry.needs_replay_trace, replay_trace, "replay_trace"), (entry.needs_file, model_dir, "model_dir"))
    for needs, value, what in needed:
        if needs and value is None:
            raise ValueError(f"predictor {name!r} needs {what}")
    directory = None if model_dir is None else Path(model_dir)
    return entry.factory(PredictorInputs(params, fit_trace, replay_trace, directory))


def load_predictor(name: str, model_dir: str | Path, params: RouterParams) -> Predictor:
    """A runtime predictor (an entry with ``runtime``) for the model in ``model_dir``."""
    entry = predictor_entry(name)
    if not entry.runtime:
        raise ValueError(f"predictor {name!r} {entry.why_trace_only}; use make_predictor with a trace")
    return make_predictor(name, params, model_dir=model_dir)
