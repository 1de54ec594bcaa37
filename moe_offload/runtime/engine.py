"""Engine: runs one MoE layer's routed experts out of the device cache, the copy engine and the CPU."""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import numpy as np
import torch

from ..cache import ExpertCache, ExpertLayout
from ..transfer import CopyEngine, HostExpertStore
from ..transfer.readback import HostReadback, grown, host_event
from .protocol import CallProtocol
from .stats import OffloadStats

# T = tokens, H = hidden size, k = experts per token, E = experts per layer, I = expert intermediate size


class Engine:
    """Per layer: the call protocol (residency, plan, copies, observe) with the experts run for real:
    device experts from their slots, CPU experts on the Numba runner, then combined."""

    def __init__(self, store: HostExpertStore, layout: ExpertLayout, cache: ExpertCache, copier: CopyEngine,
                 stats: OffloadStats, cpu_experts: str = "never", costs=None, cpu_runner=None, act: str = "silu",
                 host_wait: str = "spin"):
        self.store = store
        self.cache = cache
        self.copier = copier
        self.stats = stats
        self.protocol = CallProtocol(layout, cache, copier, stats, cpu_experts, costs, cache.slots.buffers.device,
                                     host_wait=host_wait)
        self.residency = self.protocol.residency
        self.cpu_runner = cpu_runner
        self.act = act
        device = cache.slots.buffers.device
        self._cpu_out: torch.Tensor | None = None     # [>= T*H] float32 page-locked: CPU experts' weighted sum
        self._cpu_inputs = HostReadback(device, host_wait)         # CPU experts' token rows, per layer that has them
        self._cpu_out_copied = host_event(device, host_wait)       # the CPU experts' output has been copied
        self.host_wait = host_wait
        self.format = store.format
        # a packed (or cast) expert is dequantized into this one buffer before its matmuls
        self._scratch = (torch.empty(store.shape.numel, dtype=self.format.compute_dtype, device=device)
                         if self.format.needs_scratch else None)
        self._cpu_blocks = self._cpu_view = None
        if cpu_experts != "never":
            from ..cpu_kernels import as_numpy_block

            # numpy views of the host rows, made once: the CPU kernels read the store in place
            self._cpu_view = (lambda row: row.numpy()) if self.format.packed else as_numpy_block
            if store.slot_of is None:     # rows never move: views made once
                self._cpu_blocks = [self._cpu_view(store.block(key)) for key in range(store.num_keys)]

    def set_host_wait(self, host_wait: str) -> None:
        """Switch how the host waits for the device (transfer.readback.HOST_WAITS): the router call's readback,
        the CPU experts' input readback and their output buffer's copy."""
        if self._cpu_out_copied is not None:
            self._cpu_out_copied.synchronize()      # the new event is unrecorded: the buffer's last copy lands first
        self.protocol.readback.set_wait(host_wait)
        self._cpu_inputs.set_wait(host_wait)
        self._cpu_out_copied = host_event(self.cache.slots.buffers.device, host_wait)
        self.host_wait = host_wait

    @property
    def prefetcher(self):
        return self.protocol.prefetcher

    def close(self) -> None:
        """Drop the device slots and the CPU views of the host store (the runtime closes the rest)."""
        self.protocol.prefetcher = None
        self._cpu_blocks = self._cpu_view = None
        empty = self.cache.slots.buffers.new_empty((0, self.cache.slots.buffers.shape[1]))
        self.cache.slots.buffers = empty
        self.copier.buffers = empty

    def run_layer(
        self,
        layer: int,
        hidden: torch.Tensor,          # [T, H]
        top_k_index: torch.Tensor,     # [T, k]
        top_k_weights: torch.Tensor,   # [T, k]
        act_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)                                  # [T*k]
        order = torch.argsort(flat, stable=True)                        # [T*k] assignments grouped by expert
        record = self.protocol.record(layer, flat)                      # [E] host counts, read back with the router's
        call = _LayerCall(self, layer, hidden, order // k, top_k_weights.reshape(-1)[order],
                          [0, *accumulate(record.counts)], act_fn)
        self.protocol.run(layer, hidden.shape[0], record, call)
        return call.combine(order, k)

    def submit_cpu(self, keys: list[int], hidden, rows, weights, starts: list[int], experts: list[int]):
        """Start CPU experts ``experts`` (flat ``keys``) on the runner; returns (future, [T, H] output)."""
        from ..cpu_kernels import CpuJob

        # One copy to page-locked host memory: the CPU kernels read token rows and routing weights there.
        hidden_host, rows_host, weights_host = self._cpu_inputs.read([hidden.detach(), rows, weights])
        hidden_host = hidden_host.reshape(hidden.shape)                    # [T, H] float32
        rows_host = rows_host.astype(np.int64)                             # [T*k] exact: row ids < 2^24
        fmt = self.format.at(keys[0] // self.store.num_experts) if self.format.packed else None   # one layer's keys
        jobs = [CpuJob(self._cpu_block(key), rows_host[starts[e] : starts[e + 1]],
                       weights_host[starts[e] : starts[e + 1]], self.act, fmt=fmt) for e, key in zip(experts, keys)]
        out = self._cpu_output(hidden.shape)
        return self.cpu_runner.submit(hidden_host, jobs, out=out.numpy()), out

    def _cpu_block(self, key: int):
        """The numpy view the CPU kernels read for ``key``: made once, or (a host cache over the disk) of the
        row that holds it now."""
        if self._cpu_blocks is not None:
            return self._cpu_blocks[key]
        return self._cpu_view(self.store.block(key))

    def _cpu_output(self, shape: torch.Size) -> torch.Tensor:
        """The page-locked [T, H] float32 buffer the CPU experts write, free of the last layer's copy."""
        if self._cpu_out_copied is not None:
            self._cpu_out_copied.synchronize()   # the previous layer's device copy has read it
        self._cpu_out = grown(self._cpu_out, shape.numel(), pin=self._cpu_out_copied is not None)
        return self._cpu_out[: shape.numel()].view(shape)

    def cpu_output_read(self, device: torch.device) -> None:
        """The device copy of the CPU experts' output is queued: the next layer may reuse the buffer once
        it has run."""
        if self._cpu_out_copied is not None:
            self._cpu_out_copied.record(torch.cuda.current_stream(device))

    def expert(self, layer: int, block, x, w, act_fn, out) -> None:
        """out = w * expert(x), the same ops transformers runs (x: [t, H] rows of this expert of MoE layer
        ``layer``); a packed block's weights are dequantized into the engine's scratch first, and an "-a8"
        format's activations rounded as its CPU kernels round them."""
        fmt = self.format.at(layer)
        gate_up, down = fmt.unpack(block, self._scratch)                    # [2I, H], [H, I]
        y = fmt.forward(x, gate_up, down, act_fn)                           # [t, H]
        out.copy_(y * w[:, None])


class _LayerCall:
    """The engine's Compute for one call: CPU experts on the runner, device experts from their slots.

    Device experts write their weighted outputs into their rows of ``ys``
    (assignments grouped by expert); CPU experts' rows stay zero. One gather in,
    one un-permute and a sum over k out: the accumulation transformers'
    grouped_mm path uses, so bf16 results round the same way.
    """

    def __init__(self, engine: Engine, layer: int, hidden, rows, weights, starts: list[int], act_fn):
        self.engine = engine
        self.layer = layer              # MoE-layer ordinal
        self.hidden = hidden            # [T, H]
        self.rows = rows                # [T*k] token row of each assignment, grouped by expert
        self.weights = weights          # [T*k] routing weight of each assignment
        self.starts = starts            # [E+1] range of each expert's assignments
        self.act_fn = act_fn
        self.cpu_job = None             # (future, [T, H] weighted sum of the CPU experts)
        self.x_sorted = self.ys = None  # [T*k, H] each
        self.on_device = False          # whether any expert ran on the device

    def cpu(self, experts: list[int], keys: list[int]) -> None:
        # The gather first, then the CPU job: once the runner's threads hold every core, work left on this
        # thread waits for a time slice (on a 2-core CPU-only run this cost about 2.5 ms per layer).
        self.x_sorted = self.hidden[self.rows]
        self.ys = self.hidden.new_zeros(self.x_sorted.shape) if experts else torch.empty_like(self.x_sorted)
        if experts:
            self.cpu_job = self.engine.submit_cpu(keys, self.hidden, self.rows, self.weights, self.starts, experts)

    def device(self, expert: int, slot: int) -> None:
        self.on_device = True
        lo, hi = self.starts[expert], self.starts[expert + 1]
        block = self.engine.cache.slots.buffers[slot]
        self.engine.expert(self.layer, block, self.x_sorted[lo:hi], self.weights[lo:hi], self.act_fn, self.ys[lo:hi])

    def combine(self, order: torch.Tensor, k: int) -> torch.Tensor:
        """[T, H] the layer's output: device experts' rows un-permuted and summed over k, plus the CPU's."""
        hidden = self.hidden
        if self.cpu_job is not None and not self.on_device:    # every expert on the CPU: the device sum is 0
            done, cpu_out = self.cpu_job
            done.result()
            out = cpu_out.to(hidden.device, non_blocking=True).to(hidden.dtype, copy=True)   # the buffer is reused
            self.engine.cpu_output_read(hidden.device)
            return out
        unsorted = torch.empty_like(self.ys).index_copy_(0, order, self.ys)   # [T*k, H] back in (token, k) order
        out = unsorted.view(hidden.shape[0], k, -1).sum(dim=1)                 # [T, H]
        if self.cpu_job is not None:
            done, cpu_out = self.cpu_job
            done.result()
            out += cpu_out.to(out.device, non_blocking=True).to(out.dtype)
            self.engine.cpu_output_read(out.device)
        return out.to(hidden.dtype)
