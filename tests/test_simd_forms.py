"""The explicit-vector block dots (cpu_kernels/simd.py) in every form this CPU can run, against exact integer
arithmetic in numpy (float64 for the weight-only int4 dot): AVX-512 BW and AVX2 (x86 pmaddwd) and the
target-independent vector IR.

Each form compiles in a subprocess with MOE_OFFLOAD_SIMD set and a fresh numba cache (numba's cache does not
key on the variable), on rows with and without a short last block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from llvmlite import binding as llvm

ACT_BLOCK = 64

SCRIPT = r"""
import json, sys
import numpy as np
from numba import njit
from moe_offload.cpu_kernels import simd

@njit
def rows8(q, xq, xs, out, tail):
    for r in range(q.shape[0]):
        out[r] = simd.q8_blocks_dot(q, r, xq, xs) if tail else simd.q8_full_blocks_dot(q, r, xq, xs)

@njit
def rows4(q, scale, zero, shift, xq, xs, xsum, out, tail):
    for r in range(q.shape[0]):
        if tail:
            out[r] = simd.q4_blocks_dot(q, r, scale, zero, shift, xq, xs, xsum)
        else:
            out[r] = simd.q4_full_blocks_dot(q, r, scale, zero, shift, xq, xs, xsum)

@njit
def rows4f(q, scale, zero, shift, xf, xfsum, out, tail):
    for r in range(q.shape[0]):
        if tail:
            out[r] = simd.q4f_blocks_dot(q, r, scale, zero, shift, xf, xfsum)
        else:
            out[r] = simd.q4f_full_blocks_dot(q, r, scale, zero, shift, xf, xfsum)

data = np.load(sys.argv[1])
result = {"form": simd.simd_form()}
for width in json.loads(sys.argv[2]):
    tail = width % 64 != 0
    q8, x, xs = data[f"q8_{width}"], data[f"x_{width}"], data[f"xs_{width}"]
    out = np.zeros(q8.shape[0], np.float32)
    rows8(q8, x, xs, out, tail)
    result[f"int8_{width}"] = out.tolist()
    q4, xd, xsum = (data[f"{k}_{width}"] for k in ("q4", "xd", "xsum"))
    for shift in (0, 1):
        scale, zero = data[f"scale_{width}_{shift}"], data[f"zero_{width}_{shift}"]
        out = np.zeros(q4.shape[0], np.float32)
        rows4(q4, scale, zero, shift, xd, xs, xsum, out, tail)
        result[f"int4_{width}_{shift}"] = out.tolist()
        out = np.zeros(q4.shape[0], np.float32)
        rows4f(q4, scale, zero, shift, data[f"xfd_{width}"], data[f"xfsum_{width}"], out, tail)
        result[f"int4f_{width}_{shift}"] = out.tolist()
print(json.dumps(result))
"""

# three whole blocks; four and a short one (int4: 9 bytes); one chunk of 16 blocks (simd.CHUNK: its scales as one
# vector); two chunks, five blocks and a short one. Weight groups of 64 (shift 0) and 128 inputs (shift 1).
WIDTHS = [192, 256 + 18, 1024, 37 * 64 + 18]
SHIFTS = (0, 1)


def _forms() -> list[str]:
    features = llvm.get_host_cpu_features()
    forms = ["generic"]
    if features.get("avx2"):
        forms.append("avx2")
    if features.get("avx512bw"):
        forms.append("avx512")
    return forms


def _groups(width: int, shift: int) -> int:
    return -(-width // (ACT_BLOCK << shift))


def _case(width: int, rng) -> dict[str, np.ndarray]:
    rows, blocks = 37, -(-width // ACT_BLOCK)
    x = rng.integers(-127, 128, width).astype(np.int16)
    xf = rng.standard_normal(width).astype(np.float32)
    return {
        f"xf_{width}": xf,
        f"xfd_{width}": np.concatenate([xf[0::2], xf[1::2]]),
        f"xfsum_{width}": np.array([xf[b * ACT_BLOCK:(b + 1) * ACT_BLOCK].sum() for b in range(blocks)], np.float32),
        f"q8_{width}": rng.integers(-127, 128, (rows, width)).astype(np.int8),
        f"x_{width}": x,
        f"xs_{width}": (rng.random(blocks) + 0.5).astype(np.float32),
        f"q4_{width}": rng.integers(0, 256, (rows, width // 2)).astype(np.uint8),
        **{f"scale_{width}_{shift}": (rng.random((rows, _groups(width, shift))) * 0.01 + 0.001).astype(np.float16)
           .view(np.int16) for shift in SHIFTS},
        **{f"zero_{width}_{shift}": (rng.random((rows, _groups(width, shift))) * 15).astype(np.float16).view(np.int16)
           for shift in SHIFTS},
        f"xd_{width}": np.concatenate([x[0::2], x[1::2]]),                   # even inputs, then odd ones
        f"xsum_{width}": np.array([x[b * ACT_BLOCK:(b + 1) * ACT_BLOCK].sum() for b in range(blocks)], np.int32),
    }


def _reference(data: dict, width: int, shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact integer block sums (int64), then the blocks' float scales in float64; the weight-only int4 dot
    in float64."""
    x = data[f"x_{width}"].astype(np.int64)
    xs = data[f"xs_{width}"].astype(np.float64)
    blocks = np.arange(width) // ACT_BLOCK
    q8 = data[f"q8_{width}"].astype(np.int64)
    per_block8 = np.stack([(q8[:, blocks == b] * x[blocks == b]).sum(1) for b in range(xs.size)], 1)
    ref8 = (per_block8 * xs).sum(1)
    packed = data[f"q4_{width}"].astype(np.int64)
    codes = np.empty((packed.shape[0], width), np.int64)
    codes[:, 0::2], codes[:, 1::2] = packed & 15, packed >> 4
    scale = data[f"scale_{width}_{shift}"].view(np.float16).astype(np.float64)
    zero = data[f"zero_{width}_{shift}"].view(np.float16).astype(np.float64)
    xsum = data[f"xsum_{width}"].astype(np.float64)
    ref4 = np.zeros(packed.shape[0])
    xf = data[f"xf_{width}"].astype(np.float64)
    ref4f = np.zeros(packed.shape[0])
    for b in range(xs.size):
        g = b >> shift
        dot = (codes[:, blocks == b] * x[blocks == b]).sum(1)
        ref4 += xs[b] * scale[:, g] * (dot - zero[:, g] * xsum[b])
        ref4f += scale[:, g] * ((codes[:, blocks == b] - zero[:, g, None]) * xf[blocks == b]).sum(1)
    return ref8, ref4, ref4f


@pytest.mark.parametrize("form", _forms())
def test_block_dots_match_exact_integer_arithmetic(form, tmp_path):
    rng = np.random.default_rng(7)
    data = {}
    for width in WIDTHS:
        data.update(_case(width, rng))
    path = tmp_path / "case.npz"
    np.savez(path, **data)
    env = dict(os.environ, MOE_OFFLOAD_SIMD=form, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), json.dumps(WIDTHS)], env=env, check=False,
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["form"] == form
    for width in WIDTHS:
        for shift in SHIFTS:
            ref8, ref4, ref4f = _reference(data, width, shift)
            for key, ref in ((f"int8_{width}", ref8), (f"int4_{width}_{shift}", ref4), (f"int4f_{width}_{shift}", ref4f)):
                got = np.asarray(result[key], np.float64)
                assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), (form, key)


def test_an_unknown_forced_form_is_refused(monkeypatch):
    from moe_offload.cpu_kernels.simd import simd_form
    monkeypatch.setenv("MOE_OFFLOAD_SIMD", "neon9000")
    with pytest.raises(ValueError, match="MOE_OFFLOAD_SIMD"):
        simd_form()
