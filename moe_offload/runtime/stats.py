"""OffloadStats: per-layer counters of what the engine did."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_COUNTERS = ("layer_calls", "tokens", "hits", "misses", "evictions", "cpu_experts", "cpu_fills", "promotions",
             "prefetch_issued", "prefetch_used", "prefetch_wasted", "prefetch_cancelled", "predicted_found", "predicted_total",
             "disk_reads", "disk_prefetches", "host_hits")


@dataclass
class OffloadStats:
    """Counters per MoE layer (index = MoE-layer ordinal, not the model layer).

    hits: selected experts already resident (or prefetched), also when the
    scheduler chooses to run a resident one on the CPU; misses: selected
    experts not resident, whether copied or run on the CPU (``cpu_experts`` of
    them ran on the CPU, the rest were copied). Prefetches are issued for a
    predicted layer, used when that layer selects them, wasted otherwise.
    ``predicted_found / predicted_total`` is the predictor's live recall at
    distance 1 (share of selected experts that were among its top-k).
    ``cpu_fills``: experts that ran on the CPU and were also copied, in the
    background, into a slot that was free (no eviction), for later calls;
    ``promotions``: CPU-run experts copied in while the link was idle, evicting
    an expert less likely to be used. With a host cache below the experts
    (the disk tier): ``host_hits``, experts a call needed that were in host
    memory; ``disk_reads``, experts read from disk (``disk_prefetches`` of them
    ahead of need).
    """

    num_layers: int
    bytes_per_expert: int
    layer_calls: np.ndarray = field(init=False)
    tokens: np.ndarray = field(init=False)
    hits: np.ndarray = field(init=False)
    misses: np.ndarray = field(init=False)
    evictions: np.ndarray = field(init=False)
    cpu_experts: np.ndarray = field(init=False)
    cpu_fills: np.ndarray = field(init=False)
    promotions: np.ndarray = field(init=False)
    prefetch_issued: np.ndarray = field(init=False)
    prefetch_used: np.ndarray = field(init=False)
    prefetch_wasted: np.ndarray = field(init=False)
    prefetch_cancelled: np.ndarray = field(init=False)  # wasted ones dropped before their copy started
    predicted_found: np.ndarray = field(init=False)
    predicted_total: np.ndarray = field(init=False)
    disk_reads: np.ndarray = field(init=False)
    disk_prefetches: np.ndarray = field(init=False)
    host_hits: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        for name in _COUNTERS:
            setattr(self, name, np.zeros(self.num_layers, dtype=np.int64))

    @property
    def copies(self) -> np.ndarray:
        """Experts copied to the device: demand copies, background fills and prefetches that started."""
        return (self.misses - self.cpu_experts + self.cpu_fills + self.promotions + self.prefetch_issued
                - self.prefetch_cancelled)

    @property
    def bytes_copied(self) -> np.ndarray:
        return self.copies * self.bytes_per_expert

    @property
    def hit_rate(self) -> float:
        total = int(self.hits.sum() + self.misses.sum())
        return float(self.hits.sum()) / total if total else 1.0

    @property
    def predictor_recall(self) -> float | None:
        total = int(self.predicted_total.sum())
        return float(self.predicted_found.sum()) / total if total else None

    def to_dict(self) -> dict:
        return {
            "hit_rate": self.hit_rate,
            "hits": int(self.hits.sum()),
            "misses": int(self.misses.sum()),
            "cpu_experts": int(self.cpu_experts.sum()),
            "cpu_fills": int(self.cpu_fills.sum()),
            "promotions": int(self.promotions.sum()),
            "bytes_copied": int(self.bytes_copied.sum()),
            "prefetch_issued": int(self.prefetch_issued.sum()),
            "prefetch_used": int(self.prefetch_used.sum()),
            "prefetch_wasted": int(self.prefetch_wasted.sum()),
            "predictor_recall": self.predictor_recall,
            "disk_reads": int(self.disk_reads.sum()),
            "bytes_read": int(self.disk_reads.sum()) * self.bytes_per_expert,
            "per_layer": {name: getattr(self, name).tolist() for name in _COUNTERS}
            | {"bytes_copied": self.bytes_copied.tolist()},
        }

    def summary(self) -> str:
        text = (f"hit rate {self.hit_rate:.1%} ({int(self.hits.sum())} hits, {int(self.misses.sum())} misses, "
                f"{int(self.cpu_experts.sum())} on CPU), {self.bytes_copied.sum() / 1e9:.3f} GB copied")
        if self.prefetch_issued.sum():
            text += (f", prefetch {int(self.prefetch_used.sum())}/{int(self.prefetch_issued.sum())} used")
        if self.predictor_recall is not None:
            text += f", predictor recall {self.predictor_recall:.1%}"
        if self.disk_reads.sum():
            text += f", {self.disk_reads.sum() * self.bytes_per_expert / 1e9:.3f} GB read from disk"
        return text
