"""The prefetch predictor and depth `run` uses by default on CUDA, searched with the simulator over the shipped
models' routing.

For each shipped model, its routing on a few held-out prompts (recorded with gate inputs, so the runtime's
predictors replay it) is replayed through the simulator with the plan's cells: the score cache at a quarter of
the experts, the hybrid scheduler, each runtime predictor that needs no per-model file at each depth, and no
prefetch. The costs are a full-size expert's of the model's family (tiny-mixtral's routing costed as
Mixtral-8x7B experts, tiny-deepseek's as DeepSeek-V2-Lite's) on each hardware profile searched, so the depth
fits the copy and compute times real models have. The pick is the (predictor, depth) with the best geometric
mean, over models and profiles, of its projected decode tokens/s over no prefetch (ties: the shallower depth, then
the predictor listed first). ``bench/runtime_defaults.py`` runs the search and writes the result to the
shipped ``configs/runtime-defaults.yaml``, which OffloadConfig reads (loading.config.cuda_defaults).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import yaml

from ..predictor.registry import NO_PREDICTOR
from .cells import Cell, Replay, run_jobs

# T = tokens, L = MoE layers


@dataclass(frozen=True)
class DefaultsSearch:
    """What the search replays and over which choices (written into the file, so it can be run again)."""

    models: dict = field(default_factory=lambda: {"tiny-mixtral": "mixtral-8x7b", "tiny-deepseek": "deepseek-v2-lite"})
    hardware: tuple[str, ...] = ("rtx4090-pcie4", "h100-pcie5")
    expert_share: float = 0.25
    predictors: tuple[str, ...] = ("cross_layer", "cross_layer_raw", "previous")
    depths: tuple[int, ...] = (1, 2, 3, 4)
    prompts: tuple[str, ...] = ()       # the prompts traced, verbatim
    max_new_tokens: int = 32
    dtype: str = "float32"              # the shipped models run in it while traced (CPU)

    def to_dict(self) -> dict:
        return asdict(self) | {"hardware": list(self.hardware), "predictors": list(self.predictors),
                               "depths": list(self.depths), "prompts": list(self.prompts)}

    @classmethod
    def from_dict(cls, data: dict) -> "DefaultsSearch":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class DefaultsResult:
    predictor: str
    prefetch_depth: int
    speedups: dict          # "predictor@depth" -> geometric mean of tokens/s over no prefetch
    tokens_per_s: dict      # model -> hardware -> "predictor@depth" (or "none") -> projected decode tokens/s
                            # (the generated tokens' calls; the prompts' are left out)

    def yaml_text(self, search: DefaultsSearch, command: str) -> str:
        data = {"predictor": self.predictor, "prefetch_depth": self.prefetch_depth,
                "speedup_over_no_prefetch": self.speedups, "decode_tokens_per_s": self.tokens_per_s,
                "search": search.to_dict()}
        return (f"# The prefetch predictor and depth `run` uses by default on CUDA, searched with the simulator\n"
                f"# over the shipped models' routing (moe_offload/simulate/defaults.py). Written by:\n#   {command}\n"
                + yaml.safe_dump(data, sort_keys=False, width=200))


def label(predictor: str, depth: int) -> str:
    return NO_PREDICTOR if predictor == NO_PREDICTOR else f"{predictor}@{depth}"


def search_defaults(search: DefaultsSearch, replays: dict, workers: int | None = None,
                    progress: bool = True) -> DefaultsResult:
    """The search over ``replays`` (model -> hardware -> (Replay, slots)); see the module docstring."""
    choices = [(NO_PREDICTOR, 1)] + [(p, d) for p in search.predictors for d in search.depths]
    jobs, keys = [], []
    for model, by_hardware in replays.items():
        for hardware, (replay, slots) in by_hardware.items():
            for predictor, depth in choices:
                jobs.append((replay, Cell("score", slots, "global", predictor, depth, None, "auto")))
                keys.append((model, hardware, label(predictor, depth)))
    results = run_jobs(jobs, workers, None, progress, desc="defaults")
    speeds: dict = {}
    for (model, hardware, name), result in zip(keys, results):
        speeds.setdefault(model, {}).setdefault(hardware, {})[name] = float(result.decode_tokens_per_s)
    runs = [per_hw for per_model in speeds.values() for per_hw in per_model.values()]
    speedups = {label(p, d): math.exp(sum(math.log(run[label(p, d)] / run[NO_PREDICTOR]) for run in runs)
                                      / len(runs)) for p, d in choices[1:]}
    best = max(choices[1:], key=lambda c: (round(speedups[label(*c)], 9), -c[1], -search.predictors.index(c[0])))
    return DefaultsResult(best[0], best[1], speedups, speeds)


def shipped_replays(search: DefaultsSearch, traces: dict) -> dict:
    """model -> hardware -> (Replay, slots): each shipped model's trace (``traces``: model -> Trace) costed
    as a full-size expert of its family on each profile, with the model's router weights for the predictors,
    at ``search.expert_share`` of its experts."""
    from ..loading.config import OffloadConfig
    from ..loading.parts import ModelParts
    from ..loading.router_params import router_params
    from ..runtime.cost import CostModel, HardwareProfile

    replays = {}
    for model, family in search.models.items():
        parts = ModelParts(model, OffloadConfig(device="cpu"))
        full = ModelParts(family, OffloadConfig(device="cpu"), weights=False)
        params = router_params(parts).to("cpu")
        slots = max(1, round(search.expert_share * parts.plan.num_experts))
        replays[model] = {}
        for hardware in search.hardware:
            cost = CostModel.for_expert(HardwareProfile.from_yaml(hardware), full.shape.hidden, full.shape.intermediate,
                                        full.dtype.itemsize, full.format.nbytes, full.format.name)
            replays[model][hardware] = (Replay(traces[model], cost, cost.bytes_per_expert, params,
                                               str(parts.directory)), slots)
    return replays


def record_traces(search: DefaultsSearch, progress: bool = True) -> dict:
    """model -> the routing trace (with gate inputs) of greedy generation from the search's prompts."""
    from ..loading.loader import from_pretrained
    from ..loading.tokenizer import load_tokenizer
    from ..runtime.tracing import record_trace

    traces = {}
    for model in search.models:
        loaded = from_pretrained(model, device="cpu", dtype=search.dtype, progress=False)
        try:
            tokenizer = load_tokenizer(loaded.config._name_or_path)
            traces[model] = record_trace(loaded, tokenizer, list(search.prompts), search.max_new_tokens,
                                         gate_inputs=True, progress=progress)
        finally:
            loaded.offload.close()
    return traces
