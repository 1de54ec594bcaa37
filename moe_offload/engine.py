"""Engine: runs one MoE layer's routed experts out of the device cache, the copy engine and the CPU."""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import numpy as np
import torch
import torch.nn.functional as F

from .cache import ExpertCache
from .residency import DEMAND, PREFETCH, ExpertResidency
from .scheduler import COPY, CPU, RESIDENT, ExpertLoad, Plan, plan_layer
from .stats import OffloadStats
from .transfer import CopyEngine, HostExpertStore, down_view, gate_up_view
from .transfer.readback import HostReadback, grown

# T = tokens, H = hidden size, k = experts per token, E = experts per layer, I = expert intermediate size


class Engine:
    """Per layer: residency lookup, placement plan, demand copies, device compute, CPU jobs, combine."""

    def __init__(self, store: HostExpertStore, cache: ExpertCache, copier: CopyEngine, stats: OffloadStats,
                 cpu_mode: str = "never", costs=None, cpu_runner=None, act: str = "silu"):
        self.store = store
        self.cache = cache
        self.copier = copier
        self.residency = ExpertResidency(cache, copier, stats, store.num_experts)
        self.stats = stats
        self.cpu_mode = cpu_mode          # "never" | "always" | "auto" (scheduler with ``costs``)
        self.costs = costs
        self.cpu_runner = cpu_runner
        self.act = act
        self.prefetcher = None
        device = cache.slots.buffers.device
        self.readback = HostReadback(device)          # the router call's numbers, one copy per layer
        self._cpu_inputs = HostReadback(device)       # CPU experts' token rows, one copy per layer that has them
        self._cpu_out: torch.Tensor | None = None     # [>= T*H] float32 page-locked: CPU experts' weighted sum
        self._cpu_out_copied = torch.cuda.Event() if device.type == "cuda" else None
        self._routed: dict[int, tuple[list[int], np.ndarray | None]] = {}   # layer -> host counts [E], probs
        self._cpu_blocks = None
        if cpu_mode != "never":
            from .cpu_kernels import as_numpy_block

            # numpy views of the host blocks, made once: the CPU kernels read the store in place
            self._cpu_blocks = [as_numpy_block(store.block(key)) for key in range(store.num_keys)]

    def close(self) -> None:
        """Drop the device slots and the CPU views of the host store (the runtime closes the rest)."""
        self.prefetcher = None
        self._cpu_blocks = None
        self._routed.clear()
        empty = self.cache.slots.buffers.new_empty((0, self.cache.slots.buffers.shape[1]))
        self.cache.slots.buffers = empty
        self.copier.buffers = empty

    def on_router(self, layer: int, gate_input: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """RouterTap listener, just before the layer's experts: everything the host needs from this router
        call (token counts per expert, router scores for the policy, the predictor's rankings) comes back
        in one readback, and the prefetches for the next layers are queued from it."""
        parts = [torch.bincount(chosen.reshape(-1), minlength=self.store.num_experts)]   # [E]
        if self.cache.policy.wants_router_probs:
            parts.append(probs)                                                          # [T, E]
        summary = [] if self.prefetcher is None else self.prefetcher.summarize(layer, gate_input, probs, chosen)
        host = self.readback.read(parts + summary)
        counts = host[0].astype(np.int64).tolist()
        self._routed[layer] = (counts, host[1].reshape(probs.shape) if len(parts) > 1 else None)
        if self.prefetcher is not None:
            self.prefetcher.issue(layer, host[len(parts):], [e for e, n in enumerate(counts) if n])

    def _routing(self, layer: int, flat: torch.Tensor) -> tuple[list[int], np.ndarray | None]:
        """Host token counts per expert [E] (and router scores [T, E]) of this call, from the router's
        readback; read here when the router hook did not run for it."""
        counts, probs = self._routed.pop(layer, (None, None))
        if counts is None or sum(counts) != flat.numel():
            counts = self.readback.read([torch.bincount(flat, minlength=self.store.num_experts)])[0]
            return counts.astype(np.int64).tolist(), None
        return counts, probs

    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,          # [T, H]
        top_k_index: torch.Tensor,     # [T, k]
        top_k_weights: torch.Tensor,   # [T, k]
        act_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        num_experts, k = self.store.num_experts, top_k_index.shape[1]
        flat = top_k_index.reshape(-1)                                  # [T*k]
        order = torch.argsort(flat, stable=True)                        # [T*k] assignments grouped by expert
        rows = order // k                                               # [T*k] token row of each assignment
        weights = top_k_weights.reshape(-1)[order]                      # [T*k]
        counts, probs = self._routing(layer, flat)                       # [E] host, read back with the router's
        starts = [0, *accumulate(counts)]                                # [E+1] range of each expert in order
        selected = [e for e in range(num_experts) if counts[e]]
        keys = {e: self.store.key(layer, e) for e in selected}
        if self.prefetcher is not None:
            self.prefetcher.begin_layer(layer, set(keys.values()))
        slots = {e: self.cache.lookup(key) for e, key in keys.items()}   # -1: not resident
        plan = self._plan(slots, counts)
        self._count(layer, hidden.shape[0], plan, {e for e, slot in slots.items() if slot >= 0})
        self._observe(layer, selected, probs)

        resident, copied, on_cpu = plan.experts(RESIDENT), plan.experts(COPY), plan.experts(CPU)
        device_experts = resident + copied         # resident first, while copies land
        locked = {keys[e] for e in device_experts}  # device experts not yet computed: never evicted
        for e in resident:
            self.residency.expedite(keys[e])       # a prefetch still queued is a demand now
        for e in copied:  # start copies now, into slots this layer does not need
            if self.residency.copy_in(keys[e], DEMAND, locked) is None:
                break
        cpu_job = self._submit_cpu(on_cpu, keys, hidden, rows, weights, starts)   # (future, [T, H] output)
        self._fill(layer, [keys[e] for e in on_cpu])
        # Device experts write their weighted outputs into their rows of ``ys`` (assignments grouped by
        # expert); CPU experts' rows stay zero. One gather in, one un-permute and a sum over k out: the
        # accumulation transformers' grouped_mm path uses, so bf16 results round the same way.
        x_sorted = hidden[rows]                                             # [T*k, H]
        ys = hidden.new_zeros(x_sorted.shape) if cpu_job is not None else torch.empty_like(x_sorted)
        for e in device_experts:
            key = keys[e]
            slot = self.cache.lookup(key)
            if slot < 0:   # no slot was free when the layer's copies started: one has been read since
                slot = self.residency.copy_in(key, DEMAND, locked)
                if slot is None:
                    raise RuntimeError(f"no evictable slot for expert {key}: every slot of its pool is in use by "
                                       "this layer; give the layer more expert slots")
            lo, hi = starts[e], starts[e + 1]
            self.copier.wait(slot, key)
            self._expert(self.cache.slots.buffers[slot], x_sorted[lo:hi], weights[lo:hi], act_fn, ys[lo:hi])
            self.copier.done_reading(slot)
            self.copier.pump()      # keep prefetch chunks flowing between experts
            locked.discard(key)
            self.cache.touch(key)
        unsorted = torch.empty_like(ys).index_copy_(0, order, ys)          # [T*k, H] back in (token, k) order
        out = unsorted.view(hidden.shape[0], k, -1).sum(dim=1)              # [T, H]
        if cpu_job is not None:
            done, cpu_out = cpu_job                                     # [T, H] weighted sum of the CPU experts
            done.result()
            out += cpu_out.to(out.device, non_blocking=True).to(out.dtype)
            if self._cpu_out_copied is not None:
                self._cpu_out_copied.record(torch.cuda.current_stream(out.device))
        return out.to(hidden.dtype)

    def _plan(self, slots: dict[int, int], counts: list[int]) -> Plan:
        if self.cpu_mode != "auto":
            loads = [ExpertLoad(e, counts[e], resident=slot >= 0) for e, slot in slots.items()]
            return plan_layer(loads, self.costs, self.cpu_mode)
        if self.costs is None:
            raise RuntimeError("cpu_experts='auto' needs a cost model")
        # A new copy queues behind what is on the link: bytes in flight / bandwidth.
        backlog = self.copier.backlog_bytes() / (self.costs.profile.h2d_gbps * 1e9)
        loads = []
        for e, slot in slots.items():
            ready = 0.0 if slot < 0 or self.copier.landed(slot) else backlog + self.costs.copy_s()
            loads.append(ExpertLoad(e, counts[e], resident=slot >= 0, ready_s=ready))
        return plan_layer(loads, self.costs, self.cpu_mode, copy_backlog_s=backlog)

    def _submit_cpu(self, experts, keys, hidden, rows, weights, starts):
        if not experts:
            return None
        from .cpu_kernels import CpuJob

        # One copy to page-locked host memory: the CPU kernels read token rows and routing weights there.
        hidden_host, rows_host, weights_host = self._cpu_inputs.read([hidden.detach(), rows, weights])
        hidden_host = hidden_host.reshape(hidden.shape)                    # [T, H] float32
        rows_host = rows_host.astype(np.int64)                             # [T*k] exact: row ids < 2^24
        jobs = [CpuJob(self._cpu_blocks[keys[e]], rows_host[starts[e] : starts[e + 1]],
                       weights_host[starts[e] : starts[e + 1]], self.act) for e in experts]
        out = self._cpu_output(hidden.shape)
        return self.cpu_runner.submit(hidden_host, jobs, out=out.numpy()), out

    def _cpu_output(self, shape: torch.Size) -> torch.Tensor:
        """The page-locked [T, H] float32 buffer the CPU experts write, free of the last layer's copy."""
        if self._cpu_out_copied is not None:
            self._cpu_out_copied.synchronize()   # the previous layer's device copy has read it
        self._cpu_out = grown(self._cpu_out, shape.numel(), pin=self._cpu_out_copied is not None)
        return self._cpu_out[: shape.numel()].view(shape)

    def _fill(self, layer: int, cpu_keys: list[int]) -> None:
        """Experts the CPU runs now also take free slots, copied at low priority, so later calls hit.
        Only free slots: nothing resident is evicted for them. Not in 'always' mode (no copies there)."""
        if self.cpu_mode != "auto":
            return
        for key in cpu_keys:   # (the scheduler may also run a resident expert on the CPU)
            if self.cache.lookup(key) < 0 and self.residency.copy_in(key, PREFETCH, evict=False) is not None:
                self.stats.cpu_fills[layer] += 1

    def _observe(self, layer: int, selected: list[int], probs: np.ndarray | None) -> None:
        policy = self.cache.policy
        if policy.wants_router_probs and probs is not None:
            policy.observe(layer, selected, probs)   # [T, E] host scores, read back with the router's
        else:
            policy.observe(layer, selected)

    def _expert(self, block, x, w, act_fn, out) -> None:
        """out = w * expert(x), the same ops transformers runs (x: [t, H] rows of this expert)."""
        shape = self.store.shape
        gate, up = F.linear(x, gate_up_view(block, shape)).chunk(2, dim=-1)  # [t, I] each
        y = F.linear(act_fn(gate) * up, down_view(block, shape))             # [t, H]
        out.copy_(y * w[:, None])

    def _count(self, layer: int, tokens: int, plan: Plan, resident: set[int]) -> None:
        """Hits: selected experts resident when the layer ran (wherever the plan runs them)."""
        self.stats.layer_calls[layer] += 1
        self.stats.tokens[layer] += tokens
        self.stats.hits[layer] += len(resident)
        self.stats.misses[layer] += len(plan.placement) - len(resident)
        self.stats.cpu_experts[layer] += sum(e not in resident for e in plan.experts(CPU))
