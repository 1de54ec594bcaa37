"""The disk tier: experts beyond host_memory stay on disk; logits and greedy ids still equal transformers'."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from transformers import AutoModelForCausalLM

import moe_offload
from moe_offload.errors import MoEOffloadError

from tiny_checkpoints import FAMILIES, num_experts

TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))  # [B, S]
PROMPT = TOKENS[:1, :6]
GENERATE = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
_REFS: dict = {}


def reference(path):
    if path not in _REFS:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            _REFS[path] = (model(TOKENS).logits, model.generate(PROMPT, **GENERATE))
    return _REFS[path]


def host_budgets(family: str) -> list:
    """(name, host rows as a multiple of one layer's experts, None: all): one layer's worth, half, all."""
    return [pytest.param(family, rows, id=f"{family}-{name}") for name, rows in
            (("one-layer", 1.0), ("half", 0.5), ("all", None))]


def load(path, host_rows, slots=3, **fields):
    """``host_rows``: experts per MoE layer times this many layers' worth (0.5: half of all experts)."""
    from moe_offload.loading.config import OffloadConfig
    from moe_offload.loading.parts import ModelParts

    fmt = {k: v for k, v in fields.items() if k == "expert_dtype"}
    plan = ModelParts(path, OffloadConfig(device="cpu", dtype=torch.float32, **fmt), weights=False).plan
    if host_rows is None:
        rows = plan.num_experts
    elif host_rows == 0.5:
        rows = plan.num_experts // 2
    else:
        rows = int(host_rows * plan.experts_per_layer)
    return moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, expert_slots=slots,
                                       host_memory=rows * plan.bytes_per_expert, **fields)


@pytest.mark.parametrize(("family", "rows"), [p for f in FAMILIES for p in host_budgets(f)])
def test_logits_and_greedy_match_with_host_budgets(checkpoints, family, rows):
    path = checkpoints[family]
    logits, generated = reference(path)
    model = load(path, rows)
    plan = model.offload.plan
    assert plan.disk_tier == (rows is not None)
    with torch.no_grad():
        assert_close(model(TOKENS).logits, logits, f"{family} host rows {rows}")
    assert torch.equal(model.generate(PROMPT, **GENERATE), generated), f"{family} host rows {rows}"
    stats = model.offload.stats
    if rows is not None:
        assert stats.disk_reads.sum() >= plan.experts_per_layer, "experts came from disk"
        assert model.offload.store.blocks.shape[0] == plan.host_rows < plan.num_experts
        if rows == 1.0:
            assert stats.disk_reads.sum() > plan.num_experts, "one layer's worth must re-read evicted experts"
    model.offload.close()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_disk_tier_under_late_copies_and_cpu_experts(checkpoints, family):
    """Copies that land late and out of order read host rows that stay put until they land; CPU-run experts
    read their rows in place."""
    path = checkpoints[family]
    logits, generated = reference(path)
    for fields in (dict(copy_backend="deferred", copy_seed=3, predictor="previous", prefetch_depth=2),
                   dict(cpu_experts="always", slots=2)):
        slots = fields.pop("slots", 6)
        model = load(path, 1.0, slots=slots, **fields)
        with torch.no_grad():
            assert_close(model(TOKENS).logits, logits, f"{family} disk tier {fields}")
        assert torch.equal(model.generate(PROMPT, **GENERATE), generated)
        model.offload.close()


def test_disk_prefetch_reads_ahead(checkpoints):
    """With a predictor, experts predicted for coming layers are read from disk ahead of need."""
    path = checkpoints["qwen3_moe"]
    logits, generated = reference(path)
    model = load(path, 1.5, slots=4, predictor="previous", prefetch_depth=2)
    with torch.no_grad():
        assert_close(model(TOKENS).logits, logits, "qwen3_moe disk prefetch")
    assert torch.equal(model.generate(PROMPT, **GENERATE), generated)
    assert model.offload.stats.disk_prefetches.sum() > 0
    model.offload.close()


def test_packed_experts_from_disk(checkpoints, tmp_path):
    """A quantized format reads the quantize-once cache file (built expert by expert); the result equals the
    same format fully in host memory."""
    path = checkpoints["olmoe"]
    full = moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, expert_dtype="int4",
                                       expert_slots=3, progress=False, quant_cache=str(tmp_path / "a"))
    model = load(path, 1.0, expert_dtype="int4", quant_cache=str(tmp_path / "b"))
    assert model.offload.engine.protocol.residency.host.source == "cache file"
    assert len(list((tmp_path / "b").glob("experts-int4-*.safetensors"))) == 1
    with torch.no_grad():
        assert_close(model(TOKENS).logits, full(TOKENS).logits, "olmoe int4 from disk")
    model.offload.close()


def test_cast_experts_from_disk(checkpoints, tmp_path):
    """bf16 compute from a float32 checkpoint: the rows are not the stored bytes, so the cache file holds them."""
    path = checkpoints["mixtral"]
    full = moe_offload.from_pretrained(path, device="cpu", dtype="bf16", expert_slots=3, progress=False)
    model = moe_offload.from_pretrained(path, device="cpu", dtype="bf16", expert_slots=3, progress=False,
                                        host_memory=8 * full.offload.plan.bytes_per_expert,
                                        quant_cache=str(tmp_path))
    assert model.offload.engine.protocol.residency.host.source == "cache file"
    with torch.no_grad():
        assert_close(model(TOKENS).logits, full(TOKENS).logits, "mixtral bf16 from disk")


def test_host_budget_below_one_layer_is_refused(checkpoints):
    path = checkpoints["mixtral"]
    bytes_per_expert = 3 * 32 * 24 * 4
    with pytest.raises(MoEOffloadError, match=r"host_memory .* fewer than one MoE layer's 8"):
        moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False,
                                    host_memory=(num_experts("mixtral") - 1) * bytes_per_expert)


def test_info_reports_three_tiers(checkpoints, capsys):
    from moe_offload.cli import main

    path = checkpoints["mixtral"]
    assert main(["info", "--model", str(path), "--expert-slots", "4", "--host-memory", "92160"]) == 0
    out = capsys.readouterr().out
    assert "host cache" in out and "disk" in out and "10 experts" in out


# --- the host tier's rules, one by one ------------------------------------------------------------------------

class _Copier:
    """Stands in for the CopyEngine: which keys a device copy may still read, and a synchronize that lands them."""

    def __init__(self):
        self.busy: set[int] = set()
        self.synchronized = 0

    def busy_keys(self) -> set[int]:
        return set(self.busy)

    def synchronize(self) -> None:
        self.synchronized += 1
        self.busy.clear()


def _tier(tmp_path, rows: int = 2, keys: int = 6, threads: int = 2):
    """A HostTier over a file holding ``keys`` 16-byte experts (expert k's bytes are all k)."""
    import numpy as np

    from moe_offload.cache import ExpertCache, ExpertLayout, ExpertSlots, make_policy, slot_pools
    from moe_offload.runtime.host_tier import HostTier
    from moe_offload.runtime.stats import OffloadStats
    from moe_offload.transfer import ExpertShape, HostExpertStore
    from moe_offload.transfer.disk import DiskReader, Run

    path = tmp_path / "experts.bin"
    path.write_bytes(np.repeat(np.arange(keys, dtype=np.uint8), 12).tobytes())   # 3 * H * I float32 = 12 bytes each
    layout = ExpertLayout(1, keys, 1)
    store = HostExpertStore(1, keys, ExpertShape(1, 1), torch.float32, pin=False, capacity=rows)
    cache = ExpertCache(ExpertSlots.bookkeeping(rows, keys), make_policy("lru", layout), slot_pools("global", rows, layout))
    runs = {k: [Run(str(path), 12 * k, 0, 12)] for k in range(keys)}
    copier = _Copier()
    return HostTier(store, cache, DiskReader(threads), runs, copier, OffloadStats(1, 12)), copier


def _bytes(store, key: int) -> list[int]:
    return store.block(key).view(torch.uint8).tolist()


def test_host_tier_reads_and_evicts_by_the_rules(tmp_path):
    tier, copier = _tier(tmp_path)
    store = tier.store
    tier.ensure(0)
    tier.ensure(1)
    assert _bytes(store, 0) == [0] * 12 and _bytes(store, 1) == [1] * 12
    copier.busy = {0}                                   # a device copy still reads expert 0's row
    tier.ensure(2, locked={1})                          # 1 locked, 0 busy: both rows in use, so the copies land
    assert copier.synchronized == 1 and not tier.resident(0) and tier.resident(1)
    assert _bytes(store, 2) == [2] * 12
    copier.busy = {2}
    tier.ensure(3)                                      # the LRU victim would be 1 anyway; 2 is busy
    assert tier.resident(2) and not tier.resident(1)
    with pytest.raises(KeyError):
        store.block(1)
    with pytest.raises(MoEOffloadError, match="host-cache row"):
        tier.ensure(4, locked={2, 3})
    assert tier.stats.disk_reads.sum() == 4
    tier.close()


def test_host_tier_prefetch_then_demand(tmp_path):
    tier, _ = _tier(tmp_path, rows=3)
    assert tier.prefetch(4) and not tier.prefetch(4)
    tier.ensure(4)                                       # waits for the prefetch read, reads nothing twice
    assert _bytes(tier.store, 4) == [4] * 12 and tier.stats.disk_reads.sum() == 1
    tier.close()


def test_disk_reader_serves_demand_first_and_cancels(tmp_path):
    """Queued prefetch reads wait behind a demand read submitted after them; a queued read can be cancelled."""
    import numpy as np

    from moe_offload.transfer.disk import DEMAND, PREFETCH, DiskReader, Run

    paths = []
    for name in "abcd":
        (tmp_path / name).write_bytes(name.encode() * 8)
        paths.append(str(tmp_path / name))
    reader = DiskReader(threads=1)
    order = []
    real = reader._pread
    reader._pread = lambda run, out: (order.append(run.path[-1]), real(run, out))
    outs = [np.zeros(8, np.uint8) for _ in paths]
    with reader._cv:                                     # the I/O thread waits until all four are queued
        reads = [reader.submit([Run(p, 0, 0, 8)], out, PREFETCH) for p, out in zip(paths[:3], outs)]
        demand = reader.submit([Run(paths[3], 0, 0, 8)], outs[3], DEMAND)
        assert reader.cancel(reads[1])
    demand.wait()
    for read in reads:
        read.wait()
    reader.close()
    assert order == ["d", "a", "c"] and bytes(outs[3]) == b"d" * 8 and not outs[1].any()


def test_stored_bytes_are_read_straight_into_the_store(checkpoints, monkeypatch):
    """Rows that are the checkpoint's bytes (same dtype, unquantized) load by positional reads, not tensor by
    tensor; a cast (bf16 from a float32 checkpoint) goes tensor by tensor."""
    from moe_offload.loading import loader

    path = checkpoints["qwen2_moe"]
    calls = []
    real = loader.fill_store
    monkeypatch.setattr(loader, "fill_store", lambda *args: calls.append(1) or real(*args))
    logits, _ = reference(path)
    model = moe_offload.from_pretrained(path, device="cpu", dtype=torch.float32, progress=False, expert_slots=3)
    assert calls == [] and model.offload.store.missing_keys() == []
    with torch.no_grad():
        assert_close(model(TOKENS).logits, logits, "qwen2_moe read straight into the store")
    moe_offload.from_pretrained(path, device="cpu", dtype="bf16", progress=False, expert_slots=3)
    assert calls == [1]


class _HeldReader:
    """A slow disk: reads ahead never start on their own (only when promoted); demand reads run at once."""

    def __init__(self, real):
        self.real, self.held = real, []

    def submit(self, runs, out, priority):
        from moe_offload.transfer.disk import PREFETCH, Read

        if priority != PREFETCH:
            return self.real.submit(runs, out, priority)
        read = Read(runs, out, priority)
        self.held.append(read)
        return read

    def promote(self, read):
        self.held.remove(read)
        self.real.submit(read.runs, read.out).wait()
        read.done.set()

    def cancel(self, read):
        if read not in self.held:
            return False
        self.held.remove(read)
        read.cancelled = True
        read.done.set()
        return True

    def close(self):
        self.real.close()


def test_reads_ahead_never_starve_a_demand(tmp_path):
    """Reads ahead holding every row give them back when a call needs one (queued ones are cancelled, their
    rows freed), instead of the demand failing."""
    tier, _ = _tier(tmp_path, rows=2)
    tier.reader = _HeldReader(tier.reader)
    assert tier.prefetch(0) and tier.prefetch(1) and not tier.ready(0)
    tier.ensure(2)
    assert _bytes(tier.store, 2) == [2] * 12 and not tier.pending and not tier.reader.held
    assert not tier.resident(0) and not tier.resident(1)
    assert tier.prefetch(3)
    tier.ensure(3)                                       # a demand for a read ahead promotes it
    assert _bytes(tier.store, 3) == [3] * 12 and tier.prefetch_used == 1
    tier.close()


def _tiers_over_a_real_copier(tmp_path):
    """Three layers of two 12-byte experts (expert k's bytes all k), a host cache of one layer's experts (two
    rows), four device slots, and the real CopyEngine on the deferred backend: a prefetch is split into
    one-element chunks with one chunk on the stream at a time, so its other chunks stay queued."""
    import numpy as np

    from moe_offload.cache import ExpertCache, ExpertLayout, ExpertSlots, make_policy, slot_pools
    from moe_offload.runtime.host_tier import HostTier
    from moe_offload.runtime.residency import ExpertResidency
    from moe_offload.runtime.stats import OffloadStats
    from moe_offload.transfer import CopyEngine, ExpertShape, HostExpertStore
    from moe_offload.transfer.disk import DiskReader, Run

    layers, experts, rows, slots = 3, 2, 2, 4
    keys = layers * experts
    path = tmp_path / "experts.bin"
    path.write_bytes(np.repeat(np.arange(keys, dtype=np.uint8), 12).tobytes())
    layout = ExpertLayout(layers, experts, 1)
    store = HostExpertStore(layers, experts, ExpertShape(1, 1), torch.float32, pin=False, capacity=rows)
    copier = CopyEngine(store, torch.zeros(slots, 3), backend="deferred", seed=1, chunk_bytes=4,
                        max_prefetch_inflight=1)
    copier.backend.land_probability = 0.0       # prefetches held: a copy lands only when something waits for it
    stats = OffloadStats(layers, experts)
    device = ExpertCache(ExpertSlots.bookkeeping(slots, keys), make_policy("lru", layout),
                         slot_pools("global", slots, layout))
    residency = ExpertResidency(device, copier, stats, experts)
    host = ExpertCache(ExpertSlots.bookkeeping(rows, keys), make_policy("lru", layout),
                       slot_pools("global", rows, layout))
    runs = {k: [Run(str(path), 12 * k, 0, 12)] for k in range(keys)}
    residency.host = HostTier(store, host, DiskReader(2), runs, copier, stats)
    return residency, copier, store


def test_a_demand_never_takes_the_host_row_of_a_queued_prefetch(tmp_path):
    """Every host row is busy (two device prefetches of layer 1 still have queued chunks) when layer 0 demands
    expert 0: the retry after landing the copies on the streams must not hand it a row a queued chunk will
    still read. The farthest-ahead queued prefetch gives its row back instead: its queued copy is cancelled
    and its device slot freed through the residency, so nothing later reads a row that holds another expert."""
    from moe_offload.runtime.residency import PREFETCH

    residency, copier, store = _tiers_over_a_real_copier(tmp_path)
    host = residency.host
    residency.call_keys = set()
    for key in (2, 3):                                   # layer 1's experts: read, then prefetched to the device
        residency.copy_in(key, PREFETCH)
    assert copier.is_queued(2) and copier.is_queued(3) and host.resident(2) and host.resident(3)
    residency.call_keys = {0}
    slot0 = residency.copy_in(0, locked={0})             # the demand: no free host row
    assert host.resident(0) and host.resident(2) and not host.resident(3)
    assert not copier.is_queued(3) and residency.cache.lookup(3) < 0
    assert residency.stats.prefetch_cancelled[1] == 1
    for _ in range(3):                                   # the rest of expert 2's prefetch lands from its own row
        copier.synchronize()
        copier.pump()
    assert not copier.is_queued(2)
    copier.synchronize()
    slot2 = residency.cache.lookup(2)
    copier.begin_read(slot2, key=2)                      # deferred backend: raises unless the slot holds expert 2
    copier.begin_read(slot0, key=0)
    assert copier.buffers[slot2].view(torch.uint8).tolist() == [2] * 12
    assert copier.buffers[slot0].view(torch.uint8).tolist() == [0] * 12
    assert store.block(0).view(torch.uint8).tolist() == [0] * 12
    host.close()


def test_a_demand_fails_clearly_when_only_locked_experts_hold_rows(tmp_path):
    """Rows held by the call's own experts and a queued prefetch the call also uses: nothing can give a row
    back, so the demand fails with the project's error instead of evicting under a copy."""
    from moe_offload.runtime.residency import PREFETCH

    residency, copier, _ = _tiers_over_a_real_copier(tmp_path)
    residency.call_keys = set()
    residency.copy_in(2, PREFETCH)
    residency.host.ensure(1)
    residency.call_keys = {1, 2, 0}
    with pytest.raises(MoEOffloadError, match="host-cache row"):
        residency.copy_in(0, locked={0, 1, 2})
    assert copier.is_queued(2) and residency.host.resident(2)
    residency.host.close()
