"""Expert predictors: exact scores on hand-made inputs, routing parity, the learned fit, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_offload.predictor import (
    ActivationMatrixPredictor,
    CorrectionFitConfig,
    CorrectionFormatError,
    CrossLayerGatePredictor,
    LearnedCorrection,
    LearnedCorrectionPredictor,
    OraclePredictor,
    PopularityPredictor,
    PreviousTokenPredictor,
    RecallCounter,
    RouterParams,
    Trace,
    correction_path,
    fit_correction,
    load_predictor,
    make_predictor,
    recall,
    replay,
    router_logits,
    selection_scores,
    topk_hits,
)

# N = tokens, L = MoE layers, E = experts, H = hidden size, k = experts per token


def make_trace(expert_ids: np.ndarray, sequence: list[int], gate_inputs: np.ndarray | None = None,
               num_experts: int | None = None) -> Trace:
    """A trace from hand-made expert ids [N, L, k]; router scores put 0.5 / k on each chosen expert."""
    n, layers, k = expert_ids.shape
    e = num_experts or int(expert_ids.max()) + 1
    probs = np.zeros((n, layers, e), np.float16)
    np.put_along_axis(probs, expert_ids.astype(np.int64), 0.5 / k, axis=2)
    return Trace(expert_ids.astype(np.int16), probs, np.asarray(sequence, np.int32), np.zeros(n, bool),
                 gate_inputs)


def random_params(layers: int, experts: int, hidden: int, seed: int = 0, scoring: str = "softmax",
                  **groups) -> RouterParams:
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(experts, hidden, generator=g) for _ in range(layers)]
    norms = [torch.rand(hidden, generator=g) + 0.5 for _ in range(layers)]
    biases = [torch.randn(experts, generator=g) * 0.1 if scoring == "sigmoid" else None for _ in range(layers)]
    return RouterParams(weights, biases, norms, scoring, **groups)


# ----------------------------------------------------------------------------- routing math


def test_cross_layer_renorm_swaps_the_norm_weight_exactly():
    params = RouterParams(
        weights=[torch.eye(3, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])],
        biases=[None, None],
        norm_weights=[torch.tensor([2.0, 1.0]), torch.tensor([1.0, 4.0])],
    )
    gate = torch.tensor([[2.0, 1.0]])                                  # layer 0: w_0 * h, h = [1, 1]
    renorm, raw = CrossLayerGatePredictor(params), CrossLayerGatePredictor(params, renorm=False)
    for p in (renorm, raw):
        p.observe(0, gate, torch.tensor([[0, 1]]), torch.zeros(1, 3))
    torch.testing.assert_close(renorm.predict(0, 1), torch.softmax(torch.tensor([[1.0, 4.0, 5.0]]), -1))  # W_1 (w_1 h)
    torch.testing.assert_close(raw.predict(0, 1), torch.softmax(torch.tensor([[2.0, 1.0, 3.0]]), -1))     # W_1 g_0
    assert renorm.name == "cross_layer" and raw.name == "cross_layer_raw"


@pytest.mark.parametrize("scoring,groups", [("softmax", {}), ("sigmoid", {}),
                                            ("sigmoid", dict(num_groups=4, top_groups=2, group_rule="top2_sum")),
                                            ("softmax", dict(num_groups=4, top_groups=2, group_rule="max"))])
def test_cross_layer_gate_is_the_true_routing_when_layers_are_identical(scoring, groups):
    one = random_params(1, 16, 12, scoring=scoring, **groups)
    params = RouterParams(one.weights * 4, one.biases * 4, one.norm_weights * 4, scoring, **groups)
    gate = torch.randn(50, 12)
    predictor = CrossLayerGatePredictor(params)
    predictor.observe(0, gate, torch.zeros(50, 4, dtype=torch.long), torch.zeros(50, 16))
    truth = selection_scores(params, 3, router_logits(params, 3, gate)).topk(4).indices      # layer 3's routing
    for d in (1, 2, 3):
        assert torch.equal(predictor.predict(0, d).topk(4).indices.sort(1).values, truth.sort(1).values)


def test_group_limited_scores_rank_the_routers_choice_first_then_the_rest_by_score():
    grouped = RouterParams([torch.eye(4)], [torch.zeros(4)], [torch.ones(4)], "sigmoid", num_groups=2, top_groups=1,
                           group_rule="top2_sum")
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.5]])       # group {2, 3} wins (0.88 + 0.82 > 0.5 + 0.95)
    assert selection_scores(grouped, 0, logits).argsort(descending=True).tolist() == [[2, 3, 1, 0]]
    hybrid = RouterParams(grouped.weights, grouped.biases, grouped.norm_weights, "sigmoid", num_groups=2,
                          top_groups=1, group_rule="top2_sum", top_k=1)
    assert selection_scores(hybrid, 0, logits).argsort(descending=True).tolist() == [[2, 1, 3, 0]]


def test_selection_scores_match_transformers_deepseek_v3_router():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3TopkRouter,
    )

    config = DeepseekV3Config(hidden_size=12, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    router = DeepseekV3TopkRouter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(200, 12)
    chosen = router(x)[2]
    for top_k in (None, 4):
        params = RouterParams([router.weight.detach()], [router.e_score_correction_bias], [torch.ones(12)],
                              "sigmoid", num_groups=4, top_groups=2, group_rule="top2_sum", top_k=top_k)
        ours = selection_scores(params, 0, router_logits(params, 0, x)).topk(4).indices
        assert torch.equal(ours.sort(1).values, chosen.sort(1).values)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"])
def test_router_params_reproduce_each_familys_routing(checkpoints, family):
    from moe_offload.loading.loader import from_pretrained
    from moe_offload.loading.router_params import router_params

    model = from_pretrained(checkpoints[family], device="cpu", progress=False)
    params = router_params(model)
    calls = []
    model.offload.router_tap.add(lambda layer, gate, probs, chosen: calls.append((layer, gate.clone(), chosen)))
    with torch.inference_mode():
        model(torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(1)))
    assert len(calls) == params.num_layers == len(model.offload.moe_layers)
    for layer, gate, chosen in calls:
        ours = selection_scores(params, layer, router_logits(params, layer, gate)).topk(chosen.shape[1]).indices
        assert torch.equal(ours.sort(1).values, chosen.long().sort(1).values)


def record_checkpoint_reads(monkeypatch) -> list[str]:
    """Names of the tensors read from any checkpoint from now on; building a host store or filling one fails."""
    from moe_offload.loading import loader
    from moe_offload.loading.checkpoint import Checkpoint

    reads, get, get_slice = [], Checkpoint.get, Checkpoint.get_slice

    def fail(*args, **kwargs):
        raise AssertionError("router parameters must not build or fill the host expert store")

    monkeypatch.setattr(Checkpoint, "get", lambda self, name: reads.append(name) or get(self, name))
    monkeypatch.setattr(Checkpoint, "get_slice", lambda self, name, i: reads.append(name) or get_slice(self, name, i))
    monkeypatch.setattr(loader, "HostExpertStore", fail)
    monkeypatch.setattr(loader, "fill_store", fail)
    return reads


def assert_same_router_params(got: RouterParams, want: RouterParams) -> None:
    assert (got.scoring, got.num_groups, got.top_groups, got.group_rule, got.top_k) == \
        (want.scoring, want.num_groups, want.top_groups, want.group_rule, want.top_k)
    for mine, theirs in zip([*got.weights, *got.norm_weights, *got.biases],
                            [*want.weights, *want.norm_weights, *want.biases], strict=True):
        assert (mine is None and theirs is None) or (torch.equal(mine, theirs) and mine.dtype == theirs.dtype)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"])
def test_router_params_of_model_parts_match_the_loaded_model_without_reading_experts(checkpoints, family,
                                                                                     monkeypatch):
    from moe_offload import OffloadConfig
    from moe_offload.loading.loader import ModelParts, from_pretrained
    from moe_offload.loading.router_params import router_params

    loaded = router_params(from_pretrained(checkpoints[family], device="cpu", progress=False))
    parts = ModelParts(checkpoints[family], OffloadConfig(device="cpu"))
    reads = record_checkpoint_reads(monkeypatch)
    params = router_params(parts)
    assert_same_router_params(params, loaded)
    assert params.num_layers == len(parts.sites) and reads
    assert not [name for name in reads if parts.adapter.expert_tensor(name)]
    assert all(".gate." in name or "layernorm" in name for name in reads)


# ----------------------------------------------------------------------------- baselines


def test_previous_token_scores_last_tokens_choice_first_then_its_scores():
    p = PreviousTokenPredictor(num_layers=3, num_experts=4)
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    p.observe(0, torch.zeros(1, 2), torch.tensor([[0, 1]]), probs)
    assert torch.equal(p.predict(0, 1), torch.zeros(1, 4))                         # no history yet
    p.observe(1, torch.zeros(1, 2), torch.tensor([[2, 0]]), probs)
    p.observe(2, torch.zeros(1, 2), torch.tensor([[1, 3]]), probs)
    p.observe(0, torch.zeros(1, 2), torch.tensor([[3, 2]]), probs)                 # next token, layer 0
    torch.testing.assert_close(p.predict(0, 1), torch.tensor([[2.1, 0.2, 2.3, 0.4]]))
    torch.testing.assert_close(p.predict(0, 2), torch.tensor([[0.1, 2.2, 0.3, 2.4]]))
    p.reset()
    p.observe(0, torch.zeros(3, 2), torch.tensor([[0, 1]] * 3), probs.expand(3, -1))
    assert torch.equal(p.predict(0, 1), torch.zeros(3, 4))


def test_previous_token_recall_on_a_hand_made_trace():
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[1, 3], [1, 0]]])          # [N=3, L=2, k=2]
    trace = make_trace(ids, [0, 0, 0], num_experts=4)
    counters = replay(PreviousTokenPredictor(2, 4), trace, distances=[1])
    # token 0: no history (zeros: top-2 by index order is arbitrary, so only count tokens 1 and 2)
    counted = replay(PreviousTokenPredictor(2, 4), trace, distances=[1], counted=np.array([False, True, True]))
    assert counted[1].hits[1] == 1 + 1          # {2,3} vs {2,1}: 1 hit; {2,1} vs {1,0}: 1 hit
    assert counted[1].recall == 0.5
    assert counters[1].truths[1] == 6 and counters[1].truths[0] == 0


def test_popularity_is_the_fit_traces_selection_frequency():
    ids = np.array([[[0, 1]], [[0, 2]], [[0, 1]], [[3, 1]]])                        # [N=4, L=1, k=2]
    p = PopularityPredictor.fit(make_trace(ids, [0, 0, 1, 1], num_experts=4))
    torch.testing.assert_close(p.frequency, torch.tensor([[0.75, 0.75, 0.25, 0.25]]))
    two = PopularityPredictor(torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]))
    two.observe(0, torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3))
    torch.testing.assert_close(two.predict(0, 1), torch.tensor([[0.3, 0.2, 0.1]] * 2))


def test_eam_predicts_from_the_most_similar_stored_sequence():
    # stored sequence 0 uses experts {0,1} everywhere, sequence 1 uses {2,3} at layer 0 and {0,3} at layer 1
    ids = np.array([[[0, 1], [0, 1]], [[0, 1], [1, 0]], [[2, 3], [0, 3]], [[3, 2], [3, 0]]])
    p = ActivationMatrixPredictor.fit(make_trace(ids, [0, 0, 1, 1], num_experts=4))
    torch.testing.assert_close(p.stored[1], torch.tensor([[0.0, 0, 2, 2], [2, 0, 0, 2]]))
    p.observe(0, torch.zeros(1, 1), torch.tensor([[3, 2]]), torch.zeros(1, 4))
    assert p.best_match() == 1
    scores = p.predict(0, 1)                                                        # [1, 4]
    assert scores[0].topk(2).indices.sort().values.tolist() == [0, 3]
    torch.testing.assert_close(scores[0, [0, 3]], torch.tensor([0.5, 0.5]), atol=2e-3, rtol=0)
    p.reset()
    p.observe(0, torch.zeros(1, 1), torch.tensor([[0, 1]]), torch.zeros(1, 4))
    assert p.best_match() == 0 and p.predict(0, 1)[0].topk(2).indices.sort().values.tolist() == [0, 1]


def _scores_walked_token_by_token(predictor, trace: Trace, distances) -> dict[tuple[int, int], torch.Tensor]:
    """Every (layer, distance)'s [N, E] scores from reset() and one token per step, the runtime's order."""
    ids = torch.from_numpy(trace.expert_ids.astype(np.int64))
    probs = torch.from_numpy(trace.router_probs.astype(np.float32))
    layers = trace.num_layers
    out = {(l, d): [] for l in range(layers) for d in distances if l + d < layers}
    for t in range(trace.num_tokens):
        if t == 0 or trace.sequence[t] != trace.sequence[t - 1]:
            predictor.reset()
        for layer in range(layers):
            predictor.observe(layer, torch.zeros(1, 1), ids[t:t + 1, layer], probs[t:t + 1, layer])
            for d in distances:
                if layer + d < layers:
                    out[layer, d].append(predictor.predict(layer, d))
    return {key: torch.cat(rows) for key, rows in out.items()}


@pytest.mark.parametrize("name", ["previous", "eam"])
def test_whole_sequence_scores_equal_the_token_by_token_walk(name):
    """The replay shortcut gives bit-identical scores, hence identical recall counts, to walking token by
    token: on a synthetic trace with repeats, and sequences sharing stored matrices (EAM ties)."""
    from moe_offload.predictor.synthetic import SyntheticTraceConfig, synthetic_trace

    fit = synthetic_trace(SyntheticTraceConfig(tokens=240, layers=4, experts=8, top_k=2, repeat=0.5,
                                               tokens_per_sequence=20, seed=1))
    held = synthetic_trace(SyntheticTraceConfig(tokens=150, layers=4, experts=8, top_k=2, repeat=0.5,
                                                tokens_per_sequence=30, seed=2))
    make = {"previous": lambda: PreviousTokenPredictor(4, 8), "eam": lambda: ActivationMatrixPredictor.fit(fit)}[name]
    walked = _scores_walked_token_by_token(make(), held, (1, 2, 3))
    seq = slice(0, 30)
    predictor = make()
    whole = predictor.whole_sequence(torch.zeros(150, 4, 1)[seq], torch.from_numpy(held.expert_ids[seq].astype(np.int64)),
                                     torch.from_numpy(held.router_probs[seq].astype(np.float32)))
    for (layer, d), scores in walked.items():
        assert torch.equal(whole(layer, d), scores[seq]), (layer, d)
    fast, slow = replay(make(), held, (1, 2, 3)), replay(make(), held, (1, 2, 3), stepwise=True)
    for d in (1, 2, 3):
        assert np.array_equal(fast[d].hits, slow[d].hits) and np.array_equal(fast[d].hits_2k, slow[d].hits_2k)
        assert fast[d].truths.sum() > 0


def test_oracle_recall_is_one_and_it_refuses_another_trace():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(40 * 4)]).reshape(40, 4, 2)
    trace = make_trace(ids, [i // 10 for i in range(40)], num_experts=8)
    counters = replay(OraclePredictor(trace), trace)
    assert all(c.recall == 1.0 and c.recall_at_2k == 1.0 for c in counters.values())
    other = make_trace((ids + 1) % 8, [i // 10 for i in range(40)], num_experts=8)
    with pytest.raises(ValueError, match="not the trace's"):
        replay(OraclePredictor(trace), other)


# ----------------------------------------------------------------------------- learned correction


def synthetic_linear_trace(params: RouterParams, mixing: torch.Tensor, tokens: int, seed: int) -> Trace:
    """Layer 1's gate input is a fixed linear map of layer 0's; each layer routes by its own router."""
    g = torch.Generator().manual_seed(seed)
    gate0 = torch.randn(tokens, params.hidden_size, generator=g).half().float()   # [N, H]
    gate1 = (gate0 @ mixing).half().float()                                         # [N, H]
    gates = torch.stack([gate0, gate1], dim=1)                                      # [N, 2, H]
    ids = torch.stack([selection_scores(params, i, router_logits(params, i, gates[:, i])).topk(2).indices
                       for i in range(2)], dim=1)                                   # [N, 2, 2]
    probs = torch.stack([torch.softmax(router_logits(params, i, gates[:, i]), -1) for i in range(2)], dim=1)
    return Trace(ids.numpy().astype(np.int16), probs.numpy().astype(np.float16),
                 (np.arange(tokens) // 50).astype(np.int32), np.zeros(tokens, bool), gates.numpy().astype(np.float16))


def test_learned_correction_recovers_a_synthetic_linear_relation(tmp_path):
    params = random_params(2, 8, 16, seed=3)
    mixing = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)) / 4
    fit = synthetic_linear_trace(params, mixing, 3000, seed=5)
    config = CorrectionFitConfig(distances=(1,), lambdas=(1e-6, 1.0), feature_set="gate")
    correction = fit_correction(fit, params, config)
    weight, bias = correction.maps[0, 1]
    torch.testing.assert_close(weight, mixing @ params.weights[1].T, atol=0.05, rtol=0.02)   # [H, E]
    torch.testing.assert_close(bias, torch.zeros(8), atol=0.05, rtol=0)
    assert correction.meta["lambdas"] == {"0+1": 1e-6}
    held = synthetic_linear_trace(params, mixing, 1000, seed=6)
    correction.save(correction_path(tmp_path))
    learned = replay(load_predictor("learned", tmp_path, params), held, distances=[1])[1]
    cross = replay(make_predictor("cross_layer", params), held, distances=[1])[1]
    assert learned.recall > 0.98 > cross.recall


def test_learned_correction_with_all_layers_features_fits_and_replays():
    two_layers = random_params(2, 8, 16, seed=3)
    mixing = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)) / 4
    two = synthetic_linear_trace(two_layers, mixing, 600, seed=5)
    params = RouterParams([two_layers.weights[i] for i in (0, 1, 1)], [None] * 3,
                          [two_layers.norm_weights[i] for i in (0, 1, 1)])       # layer 2 repeats layer 1
    three = Trace(two.expert_ids[:, [0, 1, 1]], two.router_probs[:, [0, 1, 1]], two.sequence, two.decode,
                  two.gate_inputs[:, [0, 1, 1]])
    correction = fit_correction(three, params, CorrectionFitConfig(distances=(1, 2), feature_set="layers"))
    assert sorted(correction.maps) == [(0, 1), (0, 2), (1, 1)]
    assert correction.maps[1, 1][0].shape == (2 * (16 + 2 * 8), 8)           # blocks of layers 1 and 0
    counters = replay(LearnedCorrectionPredictor(correction, params), three, distances=[1, 2])
    assert counters[1].recall > 0.9 and counters[2].recall > 0.9


def test_learned_correction_save_load_round_trip(tmp_path):
    maps = {(0, 1): (torch.randn(5, 4), torch.randn(4)), (1, 1): (torch.randn(10, 4), torch.randn(4)),
            (0, 2): (torch.randn(5, 4), torch.randn(4))}
    correction = LearnedCorrection(maps, 3, 4, "layers", {"lambdas": {"0+1": 0.1}})
    loaded = LearnedCorrection.load(correction.save(tmp_path / "c.safetensors"))
    assert sorted(loaded.maps) == sorted(maps) and loaded.max_distance == 2
    for key, (weight, bias) in maps.items():
        assert torch.equal(loaded.maps[key][0], weight) and torch.equal(loaded.maps[key][1], bias)
    assert (loaded.num_layers, loaded.num_experts, loaded.feature_set) == (3, 4, "layers")
    assert loaded.meta == {"lambdas": {"0+1": 0.1}}
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CorrectionFormatError):
        LearnedCorrection.load(tmp_path / "bad.safetensors")


def test_learned_predictor_applies_map_and_family_scoring():
    params = random_params(2, 4, 3, scoring="sigmoid")
    weight = torch.zeros(3 + 8, 4)                                                  # block: gate, one-hot, probs
    weight[3:7] = torch.eye(4)                                                      # layer 0's one-hot choice
    correction = LearnedCorrection({(0, 1): (weight, torch.zeros(4))}, 2, 4, "gate+routing")
    p = LearnedCorrectionPredictor(correction, params)
    p.observe(0, torch.randn(1, 3), torch.tensor([[1, 2]]), torch.zeros(1, 4))
    expected = torch.sigmoid(torch.tensor([[0.0, 1.0, 1.0, 0.0]])) + params.biases[1]
    torch.testing.assert_close(p.predict(0, 1), expected)
    with pytest.raises(ValueError):
        p.predict(0, 2)


# ----------------------------------------------------------------------------- registry and metrics


def test_registry_names_and_errors():
    params = random_params(3, 4, 2)
    trace = make_trace(np.zeros((2, 3, 1), int), [0, 1], num_experts=4)
    for name in ("cross_layer", "cross_layer_raw", "previous", "popularity", "eam", "oracle"):
        p = make_predictor(name, params, fit_trace=trace, replay_trace=trace)
        assert p.name == name and p.num_layers == 3 and p.num_experts == 4
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("nope", params)
    with pytest.raises(FileNotFoundError, match="fit it first"):
        load_predictor("learned", "/no/such/model", params)
    with pytest.raises(ValueError, match="needs gate inputs"):
        replay(make_predictor("cross_layer", params), trace)


def test_registry_table_drives_make_and_load():
    from moe_offload.predictor import PREDICTOR_NAMES, PREDICTORS, RUNTIME_PREDICTORS

    assert PREDICTOR_NAMES == tuple(PREDICTORS) and RUNTIME_PREDICTORS[0] == "none"
    params = random_params(3, 4, 2)
    trace = make_trace(np.zeros((2, 3, 1), int), [0, 1], num_experts=4)
    for name, entry in PREDICTORS.items():
        if entry.needs_file:
            continue
        made = make_predictor(name, params, fit_trace=trace, replay_trace=trace)
        assert made.needs_gate_inputs == entry.needs_gate_inputs, name
        needs = {"params": entry.needs_router_params, "fit_trace": entry.needs_fit_trace,
                 "replay_trace": entry.needs_replay_trace}
        for what in (w for w, needed in needs.items() if needed):
            given = {"fit_trace": trace, "replay_trace": trace} | {what: None}
            with pytest.raises(ValueError, match=f"needs {what}"):
                make_predictor(name, params if what != "params" else None,
                               **{k: v for k, v in given.items() if k != "params"})
        if entry.runtime:
            assert load_predictor(name, "/no/such/model", params).name == name
        else:
            with pytest.raises(ValueError, match="use make_predictor with a trace"):
                load_predictor(name, "/no/such/model", params)


def test_recall_metrics_on_hand_made_cases():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.0, 0.3, 0.2, 0.1]])
    chosen = torch.tensor([[0, 3], [1, 2]])
    assert topk_hits(scores, chosen, 2).tolist() == [1, 2]
    assert recall(scores, chosen) == 0.75
    assert recall(scores, chosen, 4) == 1.0
    counter = RecallCounter(num_layers=3, top_k=2)
    counter.add(2, scores, chosen)
    counter.add(1, scores[:1], chosen[:1])
    assert counter.per_layer_recall == [None, 0.5, 0.75]
    assert counter.recall == pytest.approx(4 / 6) and counter.recall_at_2k == 1.0


def test_learned_correction_refuses_other_router_weights(tmp_path):
    params = random_params(2, 8, 16, seed=3)
    mixing = torch.randn(16, 16, generator=torch.Generator().manual_seed(4)) / 4
    correction = fit_correction(synthetic_linear_trace(params, mixing, 500, seed=5), params,
                                CorrectionFitConfig(distances=(1,), feature_set="gate"))
    LearnedCorrectionPredictor(correction, params)
    with pytest.raises(ValueError, match="other router weights"):
        LearnedCorrectionPredictor(correction, random_params(2, 8, 16, seed=9))
    with pytest.raises(ValueError, match="does not fit"):
        LearnedCorrectionPredictor(correction, random_params(3, 8, 16, seed=3))
