"""moe_offload.cpu_kernels: numba kernels for routed experts whose weights stay in host memory.

    expert_ffn(x, block, hidden, inter, act, out, scratch, scales=None)  one expert, T tokens
    packed_ffn(x, row, fmt, act, out, scratch, rows)                      one packed expert (int8, int4, fp8)
    CpuRunner(num_threads).submit(hidden, [CpuJob(...)], out) -> Future  background execution
    CpuRunner.measure_backends(H, I, formats); .backend(fmt, T)         Numba or torch, chosen by measurement
    as_numpy_block(tensor)                                                torch block -> numpy view
    quantize_block_int8(block, hidden, inter) -> (q, scales)              optional int8 weights
"""

from .activations import ACTIVATIONS
from .blocks import as_numpy_block, as_torch_block, block_matrices
from .ffn import expert_ffn
from .packed_ffn import packed_ffn
from .quant import dequantize_block_int8, quantize_block_int8
from .runner import CpuJob, CpuRunner
from .workspace import Workspace

__all__ = [
    "ACTIVATIONS",
    "CpuJob",
    "CpuRunner",
    "Workspace",
    "as_numpy_block",
    "as_torch_block",
    "block_matrices",
    "dequantize_block_int8",
    "expert_ffn",
    "packed_ffn",
    "quantize_block_int8",
]
