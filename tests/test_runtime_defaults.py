"""The prefetch predictor and depth `run` uses by default on CUDA are read from the shipped
configs/runtime-defaults.yaml, and that file holds what the defaults search picks from its own recipe."""

from __future__ import annotations

import pytest
import torch
import yaml

from moe_offload.errors import MoEOffloadError
from moe_offload.loading import config
from moe_offload.loading.config import OffloadConfig, device_defaults, read_searched_defaults
from moe_offload.resources import shipped_path
from moe_offload.simulate.defaults import DefaultsSearch, record_traces, search_defaults, shipped_replays

SHIPPED = yaml.safe_load(shipped_path("moe_offload.configs", config.SEARCHED_DEFAULTS_FILE).read_text())


def test_cuda_defaults_come_from_the_shipped_file(monkeypatch):
    assert {k: device_defaults("cuda")[k] for k in config.SEARCHED_FIELDS} == \
        {"predictor": SHIPPED["predictor"], "prefetch_depth": SHIPPED["prefetch_depth"]}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a config only: nothing runs on the GPU
    cfg = OffloadConfig(device="cuda")
    assert (cfg.resolved_predictor, cfg.resolved_prefetch_depth) == (SHIPPED["predictor"], SHIPPED["prefetch_depth"])
    assert OffloadConfig(device="cuda", prefetch_depth=5).resolved_prefetch_depth == 5   # a given depth wins
    assert OffloadConfig(device="cpu").resolved_predictor == "none"


def test_another_file_gives_other_defaults(tmp_path, monkeypatch):
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump({"predictor": "previous", "prefetch_depth": 3}))
    monkeypatch.setattr(config, "searched_defaults", lambda: read_searched_defaults(path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = OffloadConfig(device="cuda")
    assert (cfg.resolved_predictor, cfg.resolved_prefetch_depth) == ("previous", 3)


@pytest.mark.parametrize("bad", [{"predictor": "oracle", "prefetch_depth": 2},
                                 {"predictor": "cross_layer", "prefetch_depth": 0}, {}])
def test_a_bad_defaults_file_is_refused(tmp_path, bad):
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(MoEOffloadError, match="runtime_defaults.py"):
        read_searched_defaults(path)


@pytest.mark.slow
def test_the_shipped_file_is_what_the_search_picks():
    """The search run again from the file's recipe (its prompts verbatim) picks the file's predictor and depth."""
    search = DefaultsSearch.from_dict(SHIPPED["search"])
    result = search_defaults(search, shipped_replays(search, record_traces(search, progress=False)), progress=False)
    assert (result.predictor, result.prefetch_depth) == (SHIPPED["predictor"], SHIPPED["prefetch_depth"])
    assert result.speedups == pytest.approx(SHIPPED["speedup_over_no_prefetch"], rel=1e-6)


@pytest.mark.cuda
def test_a_cuda_model_prefetches_with_the_searched_defaults():
    from moe_offload.loading.loader import from_pretrained

    model = from_pretrained("tiny-mixtral", device="cuda", progress=False)
    try:
        assert model.offload.engine.protocol.prefetcher.depth == SHIPPED["prefetch_depth"]
    finally:
        model.offload.close()
