"""moe_offload.cpu_kernels: numba kernels for routed experts whose weights stay in host memory.

    expert_ffn(x, block, hidden, inter, act, out, scratch, scales=None)  one expert, T tokens
    CpuRunner(num_threads).submit(hidden, [CpuJob(...)], out) -> Future  background execution
    as_numpy_block(tensor)                                                torch block -> numpy view
    quantize_block_int8(block, hidden, inter) -> (q, scales)              optional int8 weights
"""

from .activations import ACTIVATIONS
from .blocks import as_numpy_block, as_torch_block, block_matrices
from .ffn import expert_ffn
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
    "quantize_block_int8",
]
