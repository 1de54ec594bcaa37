"""The cache simulator replaying a trace reproduces the engine's own counts: prefetch, hybrid scheduler."""

from __future__ import annotations

import shutil

import pytest

from moe_offload.loading.router_params import router_params
from moe_offload.predictor import make_predictor
from moe_offload.simulate import RoutingArrays, Simulator

from tiny_checkpoints import add_char_tokenizer

PROMPTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\nimport sys\n"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, mixtral_dir):
    return add_char_tokenizer(shutil.copytree(mixtral_dir, tmp_path_factory.mktemp("replay") / "m"))


def engine_run(model_dir, policy: str, slots: int, predictor: str, **fields):
    """(engine stats, trace of the same generation, router params)."""
    from transformers import AutoTokenizer

    from moe_offload.loading.loader import from_pretrained
    from moe_offload.runtime.tracing import record_trace

    model = from_pretrained(model_dir, device="cpu", expert_slots=slots, cache_policy=policy, predictor=predictor,
                            progress=False, **fields)
    trace = record_trace(model, AutoTokenizer.from_pretrained(model_dir), PROMPTS, max_new_tokens=8,
                         gate_inputs=True, progress=False)
    return model.offload.stats, trace, router_params(model).to("cpu")


@pytest.mark.parametrize("policy", ["lru", "score"])
@pytest.mark.parametrize("predictor", ["previous", "cross_layer"])
def test_replay_matches_the_engine_with_prefetch(model_dir, policy, predictor):
    slots = 5                                                    # of 24 experts: prefetches must evict
    stats, trace, params = engine_run(model_dir, policy, slots, predictor)
    assert stats.prefetch_issued.sum() > 0 and stats.prefetch_cancelled.sum() == 0   # on CPU every copy starts
    simulator = Simulator(RoutingArrays.of(trace), predictor=lambda: make_predictor(predictor, params))
    result = simulator.run(policy, slots)
    assert result.hits_per_layer == tuple(stats.hits.tolist())
    assert result.misses_per_layer == tuple(stats.misses.tolist())
    assert result.prefetch_copies == stats.prefetch_issued.sum()
    assert result.prefetch_used == stats.prefetch_used.sum() > 0
    plain = Simulator(RoutingArrays.of(trace)).run(policy, slots)
    assert result.hits > plain.hits                              # prefetch turned misses into hits


def test_replay_needs_what_the_predictor_reads(model_dir):
    _, trace, params = engine_run(model_dir, "lru", 24, "none")
    trace.gate_inputs = None
    routing = RoutingArrays.of(trace)
    with pytest.raises(ValueError, match="gate inputs"):
        Simulator(routing, predictor=lambda: make_predictor("cross_layer", params)).run("lru", 5)
    result = Simulator(routing, predictor=lambda: make_predictor("previous", params)).run("lru", 5)  # selections only
    assert result.prefetch_copies > 0
    without_scores = RoutingArrays(trace.expert_ids, None, trace.sequence, trace.decode, num_experts=8)
    with pytest.raises(ValueError, match="router scores"):
        Simulator(without_scores, predictor=lambda: make_predictor("previous", params))


@pytest.mark.parametrize("slots", [5, 24])
def test_replay_matches_the_engine_with_the_hybrid_scheduler(model_dir, tmp_path, slots):
    from transformers import AutoConfig

    from moe_offload.runtime.cost import CostModel, HardwareProfile

    # costs under which 1-token misses run on the CPU and prompt misses are copied
    profile = HardwareProfile(name="split", h2d_gbps=0.01, copy_latency_us=0.0, gpu_mem_gbps=1000.0,
                              gpu_tflops=1000.0, gpu_launch_us=0.0, cpu_mem_gbps=1.0, cpu_gflops=0.02,
                              cpu_start_us=0.0)
    path = profile.to_yaml(tmp_path / "split.yaml")
    stats, trace, _ = engine_run(model_dir, "score", slots, "none", cpu_experts="auto", hardware=str(path))
    assert 0 < stats.cpu_experts.sum() < stats.misses.sum()
    config = AutoConfig.from_pretrained(model_dir)
    cost = CostModel.for_expert(HardwareProfile.from_yaml(path), config.hidden_size, config.intermediate_size, 4)
    result = Simulator(RoutingArrays.of(trace), cost, cpu_experts="auto", timed_link=False).run("score", slots)
    assert result.hits_per_layer == tuple(stats.hits.tolist())
    assert result.misses_per_layer == tuple(stats.misses.tolist())
    assert result.cpu_fills == stats.cpu_fills.sum()
    if slots == 24:   # every expert fits: CPU runs fill the free slots
        assert result.cpu_fills > 0


class _Costs:
    """Copies take ``copy`` s (10 bytes per expert), a device run ``gpu`` s, the CPU never pays off."""

    def __init__(self, copy: float, gpu: float):
        self.copy, self.gpu = copy, gpu

    def copy_s(self) -> float:
        return self.copy

    def link_s(self, nbytes: int) -> float:
        return nbytes / 10 * self.copy

    def gpu_s(self, tokens: int) -> float:
        return self.gpu

    def cpu_s(self, tokens: int) -> float:
        return 1e9


def test_prefetch_spends_only_the_link_time_calls_leave_free(model_dir):
    _, trace, _ = engine_run(model_dir, "lru", 5, "none")
    routing = RoutingArrays.of(trace)
    oracle = lambda: make_predictor("oracle", replay_trace=trace)   # noqa: E731
    # compute free: every call waits on its own demand copies, the link is never idle, no prefetch fits
    plain = Simulator(routing, _Costs(1.0, 0.0), bytes_per_expert=10).run("lru", 5)
    assert plain.seconds == plain.copies
    fetched = Simulator(routing, _Costs(1.0, 0.0), bytes_per_expert=10, predictor=oracle).run("lru", 5)
    assert fetched.prefetch_copies == 0 and fetched.seconds == plain.seconds
    # compute slower than copies: prefetches fill the idle link, land in time and shorten the replay
    plain = Simulator(routing, _Costs(1.0, 3.0), bytes_per_expert=10).run("lru", 5)
    fetched = Simulator(routing, _Costs(1.0, 3.0), bytes_per_expert=10, predictor=oracle).run("lru", 5)
    assert fetched.prefetch_copies > 0 and fetched.prefetch_used == fetched.prefetch_copies
    assert fetched.seconds < plain.seconds
    assert fetched.bytes_copied == 10 * (fetched.copies + fetched.prefetch_copies + fetched.promotions)
