"""Time on the link: the simulator's link model, the prefetch budget, promotion, oracle@R, planning from a config."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from moe_offload.cache import ExpertLayout, ExpertSlots
from moe_offload.cli import main
from moe_offload.models import SHAPE_PRESETS, preset_dir
from moe_offload.predictor import make_predictor
from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace
from moe_offload.runtime.cost import CostModel, HardwareProfile
from moe_offload.runtime.worth import USE_ALPHA, ExpectedUse, LinkBudget
from moe_offload.simulate import RoutingArrays, SimulatedLink, Simulator


def test_the_link_serves_demand_copies_before_prefetches():
    link = SimulatedLink(copy_s=2.0, bytes_per_expert=100)
    link.prefetch(1, slot=0)
    link.prefetch(2, slot=1)
    link.advance(1.0)                                   # half of prefetch 1
    link.copy(3, slot=2)                                # a demand copy jumps the queue
    assert link.backlog_bytes() == 100 and link.pending_bytes() == 100 + 50 + 100
    assert not link.cancel(1) and link.cancel(2)        # started: lands; not started: dropped
    assert link.copies == 2 and link.demand == 1
    link.advance(2.0)                                   # the demand copy lands first
    assert link.landed(2) and not link.landed(0)
    assert link.ready_bytes(0) == 50                    # what is left of prefetch 1
    assert link.expedite(1) and link.backlog_bytes() == 50
    link.advance(1.0)
    assert link.idle() and link.landed(0) and link.now == 4.0


def test_a_link_without_costs_lands_every_copy_at_once():
    link = SimulatedLink()
    link.copy(3, slot=0)
    link.prefetch(4, slot=1)
    assert link.idle() and link.landed(0) and link.landed(1) and link.copies == 2


def test_budget_fits_copies_that_land_before_their_layer():
    budget = LinkBudget(start_s=1.0, copy_s=2.0, durations=(4.0, 5.0))
    assert budget.fits(1, queued=0) and not budget.fits(1, queued=1)   # 1 + 2 <= 4; 1 + 4 > 4
    assert not budget.fits(3, queued=0)                                # no deadline: no layer there
    assert budget.deadline(2) == 9.0


def test_budget_projects_coming_layers_when_a_deadline_needs_them():
    asked = []

    def project(distance):
        asked.append(distance)
        return {1: 1.0, 2: 4.0}[distance]          # layers l+1 and l+2 as projected

    budget = LinkBudget(start_s=0.5, copy_s=2.0, durations=[3.0], depth=3, predict=project)
    assert budget.fits(1, queued=0) and asked == []                    # lands at 2.5 <= 3: nothing to project
    assert not budget.fits(2, queued=1) and asked == [1]               # lands at 4.5, after 3 + 1
    assert budget.fits(3, queued=1) and asked == [1, 2]                # 4.5 <= 3 + 1 + 4, starts at 2.5 < 3
    hidden = LinkBudget(start_s=0.5, copy_s=2.0, durations=[2.0], slack=lambda d, e: 1.0 if e == 7 else 0.0)
    assert hidden.fits(1, queued=0, expert=7) and not hidden.fits(1, queued=0, expert=3)   # 2.5 <= 2 + 1; > 2


def test_budget_queues_farther_copies_only_in_this_calls_link_time():
    budget = LinkBudget(start_s=1.0, copy_s=2.0, durations=(4.0, 5.0, 11.0))
    assert budget.fits(2, queued=0) and budget.fits(2, queued=1)       # start at 1 and 3: before the call ends at 4
    assert not budget.fits(2, queued=2)                                # starts at 5 and would land at 7 <= 9, but
    assert not budget.fits(3, queued=5)                                # the next call can queue it as early


def test_expected_use_protects_likelier_residents():
    layout = ExpertLayout(num_layers=2, experts_per_layer=4, top_k=1)
    use = ExpectedUse(layout)
    for _ in range(10):
        use.observe(0, [1])
    use.observe(1, [2])
    assert use.use[1] == pytest.approx(1 - (1 - USE_ALPHA) ** 10) and use.use[6] == pytest.approx(USE_ALPHA)
    slots = ExpertSlots.bookkeeping(3, layout.num_keys)
    for slot, key in enumerate((1, 6, 7)):
        slots.assign(key, slot)
    assert use.protected(slots, 0.5) == {1}
    assert use.protected(slots, USE_ALPHA) == {1, 6}
    assert use.protected(slots, 0.0) == {1, 6, 7}


def test_oracle_at_recall_r_keeps_that_share_of_the_true_experts():
    trace = synthetic_trace(SyntheticTraceConfig(tokens=400, layers=3, experts=16, top_k=4, seed=1))
    for recall in (1.0, 0.8, 0.5, 0.0):
        predictor = make_predictor(f"oracle@{recall}", replay_trace=trace)
        assert predictor.name == f"oracle@{recall:g}"
        kept = (predictor.noisy_ids.unsqueeze(-1) == torch.from_numpy(trace.expert_ids.astype(np.int64))
                .unsqueeze(-2)).any(-1).float().mean().item()
        assert kept == pytest.approx(recall, abs=0.03)
        rows = predictor.noisy_ids.sort(dim=-1).values
        assert torch.all(rows[..., 1:] != rows[..., :-1])          # k distinct experts per token and layer


def mixtral_decode(tokens: int = 160):
    """A Mixtral-8x7B-shaped decode trace (32 layers, 8 experts, top-2) and its costs on an RTX 4090."""
    trace = synthetic_trace(SyntheticTraceConfig(tokens=tokens, layers=32, experts=8, top_k=2, skew=0.3, repeat=0.1))
    cost = CostModel.for_expert(HardwareProfile.from_yaml("rtx4090-pcie4"), 4096, 14336, 2)
    return trace, cost, 3 * 4096 * 14336 * 2


def test_promotion_makes_the_cache_policy_matter_in_decode():
    trace, cost, nbytes = mixtral_decode()
    routing = RoutingArrays.of(trace)
    runs = {policy: Simulator(routing, cost, nbytes, "auto").run(policy, 64) for policy in ("lru", "score", "belady")}
    assert all(r.promotions > 0 for r in runs.values())
    assert len({r.hits for r in runs.values()}) == 3                     # the policies now decide
    assert runs["belady"].tokens_per_s >= max(runs["lru"].tokens_per_s, runs["score"].tokens_per_s)


def test_oracle_prefetch_pays_for_itself_and_recall_buys_speed():
    trace, cost, nbytes = mixtral_decode()
    routing = RoutingArrays.of(trace)

    def speed(predictor):
        maker = None if predictor is None else (lambda: make_predictor(predictor, replay_trace=trace))
        return Simulator(routing, cost, nbytes, "auto", predictor=maker, prefetch_depth=3).run("score", 64).tokens_per_s

    none, oracle, partial = speed(None), speed("oracle"), speed("oracle@0.5")
    assert oracle > partial > none


@pytest.mark.parametrize("preset", SHAPE_PRESETS)
def test_sweep_plans_from_a_shape_preset_without_weights(preset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sweep", "--model", preset, "--simulate", "--synthetic-tokens", "48", "--budgets", "25%",
            "--policies", "score", "--predictor", "none,oracle@0.5", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "CPU experts auto" in printed and "no weights to trace" in printed
    payload = json.loads((out / "sweep.json").read_text())
    assert [r["predictor"] for r in payload["results"]] == ["none", "oracle@0.5"]
    assert all(r["tokens_per_s"] > 0 for r in payload["results"])


def test_a_directory_with_config_json_only_is_planned_not_run(tmp_path, capsys):
    model = tmp_path / "mixtral"
    model.mkdir()
    shutil.copy(preset_dir("mixtral-8x7b") / "config.json", model / "config.json")
    assert main(["info", "--model", str(model), "--gpu-memory", "24GiB"]) == 0
    assert "none: config.json only" in capsys.readouterr().out
    assert main(["sweep", "--model", str(model), "--out", str(tmp_path / "o")]) == 2
    assert "add --simulate" in capsys.readouterr().err
    default = ["sweep", "--model", str(model), "--simulate", "--synthetic-tokens", "32", "--budgets", "50%",
               "--policies", "lru", "--out", str(tmp_path / "p")]
    assert main(default) == 0   # the GPU default predictor cannot run without router weights: said, then none
    assert "projected without prefetch" in capsys.readouterr().out


def test_looking_farther_ahead_does_not_slow_decode():
    """Copies for farther layers only fill the current call's link time, so a deeper prefetch does not take
    the link from nearer layers' copies (DeepSeek-V2-Lite shape: many small experts, top-6)."""
    trace = synthetic_trace(SyntheticTraceConfig(tokens=60, layers=26, experts=64, top_k=6, skew=0.3, repeat=0.1))
    cost = CostModel.for_expert(HardwareProfile.from_yaml("rtx4090-pcie4"), 2048, 1408, 2)
    routing = RoutingArrays.of(trace)

    def speed(depth):
        maker = lambda: make_predictor("oracle", replay_trace=trace)  # noqa: E731
        simulator = Simulator(routing, cost, 3 * 2048 * 1408 * 2, "auto", predictor=maker, prefetch_depth=depth)
        return simulator.run("score", 26 * 64 // 4).tokens_per_s

    near, far = speed(2), speed(4)
    assert far >= 0.995 * near


def test_coming_layers_are_projected_from_the_prediction_and_the_cache():
    """Budgeted prefetch plans the layers in between from the prediction, and lets a copy land as late as
    its layer's CPU-run experts allow."""
    from moe_offload.cache import ExpertCache, make_policy
    from moe_offload.runtime.prefetch import Prediction
    from moe_offload.runtime.protocol import CallProtocol
    from moe_offload.runtime.stats import OffloadStats

    _, cost, nbytes = mixtral_decode(4)
    layout = ExpertLayout(num_layers=4, experts_per_layer=8, top_k=2)
    cache = ExpertCache(ExpertSlots.bookkeeping(4, layout.num_keys), make_policy("lru"))
    protocol = CallProtocol(layout, cache, SimulatedLink(cost.copy_s(), nbytes), OffloadStats(4, nbytes), "auto", cost)
    protocol.layer_s[:] = 7.0                                         # last durations: not used when predicted
    protocol.residency.copy_in(layout.key(2, 5))                      # layer 2's expert 5 holds a slot
    shares = np.zeros(8)
    shares[[3, 5]] = 0.5
    weights = np.full(8, -1.0)
    weights[[3, 5]] = 1.0
    prediction = Prediction([shares, shares], [weights, weights], top_k=2)
    both_on_cpu = protocol._projected_s(1, prediction, 1, tokens=1)  # layer 1: neither 3 nor 5 resident
    one_resident = protocol._projected_s(2, prediction, 2, tokens=1)
    assert both_on_cpu == pytest.approx(2 * cost.cpu_s(1))
    assert one_resident == pytest.approx(cost.cpu_s(1))              # the device expert runs meanwhile
    assert protocol._projected_s(3, prediction, 3, tokens=1) == 7.0  # beyond the prediction: the last duration
    # a copy of 3 into layer 1 may land as late as 5's CPU run outlasts 3's device run; into layer 2 not at all
    assert protocol._slack_s(1, prediction, 1, 3, tokens=1) == pytest.approx(cost.cpu_s(1) - cost.gpu_s(1))
    assert protocol._slack_s(2, prediction, 2, 3, tokens=1) == 0.0
    protocol.cpu_experts = "never"                                    # misses copied: no CPU run to hide behind
    assert protocol._slack_s(1, prediction, 1, 3, tokens=1) == 0.0
