"""Parity with prefetching on: every runtime predictor, every budget."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_close
from transformers import AutoTokenizer

import moe_offload
from moe_offload import MoEOffloadError
from moe_offload.loading.router_params import router_params
from moe_offload.predictor.fit_correction import fit_correction
from moe_offload.predictor.registry import correction_path
from moe_offload.runtime.tracing import record_trace

from copy_timing import COPY_TIMINGS, greedy, load, reference
from tiny_checkpoints import add_char_tokenizer, num_experts

TOKENS = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(5))  # [B, S]
PROMPTS = ["def f(x):", "import os", "class A:", "for i in range(3):", "x = [1, 2]", "print('hi')"]
FITTED = ["mixtral", "deepseek_v3", "qwen2_moe"]   # families the fitted fixture prepares
GENERATE = greedy(8)


def budgets() -> list:
    """(family, expert_slots, prefetch_depth): 1 slot at depth 1, half of one layer's experts (E // 2) at
    depths 2 and 3, E slots at depth 1."""
    params = []
    for family in FITTED:
        e = num_experts(family)
        for slots, depth in ((1, 1), (e // 2, 2), (e // 2, 3), (e, 1)):
            name = f"{family}-{slots}slot{'s' * (slots > 1)}-depth{depth}"
            params.append(pytest.param(family, slots, depth, id=name))
    return params


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, checkpoints):
    """Copies of the tiny checkpoints with a learned correction fitted on their own traces."""
    out = {}
    for family in FITTED:
        path = add_char_tokenizer(shutil.copytree(checkpoints[family], tmp_path_factory.mktemp(family) / "m"))
        model = moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False)
        trace = record_trace(model, AutoTokenizer.from_pretrained(path), PROMPTS, 6, gate_inputs=True,
                             progress=False)
        fit_correction(trace, router_params(model)).save(correction_path(path))
        out[family] = path
    return out


@pytest.mark.parametrize("timing", COPY_TIMINGS)
@pytest.mark.parametrize(("family", "slots", "depth"), budgets())
@pytest.mark.parametrize("predictor", ["cross_layer", "cross_layer_raw", "learned", "previous"])
def test_prefetch_keeps_the_math(fitted, family, slots, depth, predictor, timing):
    path = fitted[family]
    expected, expected_ids = reference(path, TOKENS, 8)
    model = load(path, timing, expert_slots=slots, predictor=predictor, prefetch_depth=depth)
    assert model.offload.engine.prefetcher is not None
    with torch.no_grad():
        assert_close(model(TOKENS).logits, expected, (family, predictor, slots, depth, timing))
    assert torch.equal(model.generate(TOKENS[:, :4], **GENERATE), expected_ids), (family, predictor, slots, depth)
    stats = model.offload.stats
    if slots == num_experts(family) // 2:
        assert stats.prefetch_issued.sum() > 0
        assert stats.prefetch_used.sum() + stats.prefetch_wasted.sum() <= stats.prefetch_issued.sum()
    if predictor != "previous" and slots == num_experts(family) // 2:
        assert stats.predictor_recall is not None and 0.0 <= stats.predictor_recall <= 1.0


def test_unknown_or_unfitted_predictor(checkpoints):
    with pytest.raises(MoEOffloadError, match="unknown predictor"):
        moe_offload.from_pretrained(checkpoints["mixtral"], device="cpu", predictor="psychic", progress=False)
    with pytest.raises(MoEOffloadError, match="does not exist; fit it first"):
        moe_offload.from_pretrained(checkpoints["olmoe"], device="cpu", predictor="learned", progress=False)
