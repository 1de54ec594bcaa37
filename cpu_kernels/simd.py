"""Explicit-vector block dots of the integer kernels (int_kernels), written as LLVM vector IR.

    # B = ACT_BLOCK (64) inputs per activation block; L = 32 int16 lanes per step
    q8_blocks_dot(q, r, xq, xs)                              sum_b xs[b] * (q[r] . xq over block b)
    q4_blocks_dot(q, r, scale, zero, group_shift, xq, xs, xsum)      xq = [even inputs | odd inputs]
        sum_b xs[b] * scale[r, g] * (sum_j lo_j * xq[j] + hi_j * xq[K/2 + j] - zero[r, g] * xsum[b]),  g = b >> group_shift

Both cover the full blocks of row r only (a short last block is the caller's). Each block's integer
dot is exact in int32 lanes: the weights are widened to int16 (int8 sign-extended; an int4 byte's low
nibble ``& 15``, its high one ``>> 4``), multiplied by the int16 activation codes in adjacent pairs
and summed into 16 int32 lanes (``pmaddwd``). The 16 lanes are converted to float32 once per block and
accumulated, times the block's scale, into 16 float32 lanes; one horizontal sum ends the row. There is
no per-block horizontal reduction, which was the cost of the scalar-loop form (LLVM's vectorizer
reduced each block's lanes to one int32 and back).

Instructions of the hot loop, by the target numba compiles for:
  * AVX-512 BW (``llvm.x86.avx512.pmaddw.d.512``): int8 ``vpmovsxbw`` zmm + ``vpmaddwd``/``vpdpwssd``;
    int4 ``vpmovzxbw`` zmm + ``vpandq`` / ``vpsrlw`` + ``vpmaddwd``/``vpdpwssd``; ``vcvtdq2ps`` +
    ``vfmadd`` per block (verified with ``inspect_asm`` on znver4, numba 0.68).
  * AVX2 (``llvm.x86.avx2.pmadd.wd`` on two ymm halves): ``vpmovsxbw``/``vpmovzxbw`` + ``vpmaddwd``.
  * anything else: the same arithmetic in target-independent vector IR (even/odd lanes multiplied and
    added), which LLVM lowers as it can.
The int4 loops prefetch 4 KB ahead of the current block into L2 (``prefetcht1``), the int8 ones 8 KB ahead
on rows of at least 8192 inputs (PREFETCH below).
``MOE_OFFLOAD_SIMD=avx512|avx2|generic`` forces one (use a fresh ``NUMBA_CACHE_DIR``: numba's cache does
not key on it). With ``NUMBA_CPU_NAME`` set (a portable cache), the generic form is used unless forced.
The intrinsics are compiled into their callers (int_kernels.py, packed_kernels.py), and numba's cache checks
only the caller's source file: after editing this file, clear the cache (``__pycache__/*.nbi``, ``*.nbc``).
"""

from __future__ import annotations

import os

from llvmlite import binding as _ll
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.core.errors import TypingError
from numba.extending import intrinsic

I8, I16, I32, F16, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.HalfType(), ir.FloatType()
LANES = 32                 # int16 lanes per step: 32 int4 bytes or 32 int8 codes
SIMD_FORMS = ("avx512", "avx2", "generic")


def simd_form() -> str:
    """The form the block dots compile to on this process's numba target (module docstring)."""
    forced = os.environ.get("MOE_OFFLOAD_SIMD", "").strip().lower()
    if forced:
        if forced not in SIMD_FORMS:
            raise ValueError(f"MOE_OFFLOAD_SIMD={forced!r}: expected one of {', '.join(SIMD_FORMS)}")
        return forced
    if config.CPU_NAME:
        return "generic"
    features = _ll.get_host_cpu_features()
    if features.get("avx512bw"):
        return "avx512"
    if features.get("avx2"):
        return "avx2"
    return "generic"


def _vec(kind, count: int) -> ir.VectorType:
    return ir.VectorType(kind, count)


def _indices(values) -> ir.Constant:
    values = list(values)
    return ir.Constant(_vec(I32, len(values)), values)


def _splat(builder, value, count: int):
    """<count x T> with every lane ``value``."""
    vt = _vec(value.type, count)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined), _indices([0] * count))


def _madd(builder, a, b, form: str):
    """<32 x i16> a, b -> <16 x i32>: lane i = a[2i] * b[2i] + a[2i+1] * b[2i+1], exact."""
    module = builder.module
    if form == "avx512":
        fn = cgutils.get_or_insert_function(
            module, ir.FunctionType(_vec(I32, 16), [_vec(I16, 32)] * 2), "llvm.x86.avx512.pmaddw.d.512")
        return builder.call(fn, [a, b])
    if form == "avx2":
        fn = cgutils.get_or_insert_function(
            module, ir.FunctionType(_vec(I32, 8), [_vec(I16, 16)] * 2), "llvm.x86.avx2.pmadd.wd")
        low, high = _indices(range(16)), _indices(range(16, 32))
        first = builder.call(fn, [builder.shuffle_vector(a, a, low), builder.shuffle_vector(b, b, low)])
        second = builder.call(fn, [builder.shuffle_vector(a, a, high), builder.shuffle_vector(b, b, high)])
        return builder.shuffle_vector(first, second, _indices(range(16)))
    even, odd, wide = _indices(range(0, LANES, 2)), _indices(range(1, LANES, 2)), _vec(I32, LANES // 2)
    undef = ir.Constant(a.type, ir.Undefined)

    def lanes(v, which):
        return builder.sext(builder.shuffle_vector(v, undef, which), wide)
    return builder.add(builder.mul(lanes(a, even), lanes(b, even)), builder.mul(lanes(a, odd), lanes(b, odd)))


def _hsum(builder, v):
    """Sum of a float vector's lanes, halving (a fixed order)."""
    count = v.type.count
    while count > 1:
        half = count // 2
        v = builder.fadd(builder.shuffle_vector(v, v, _indices(range(half))),
                         builder.shuffle_vector(v, v, _indices(range(half, count))))
        count = half
    return builder.extract_element(v, ir.Constant(I32, 0))


def _load_vector(builder, base, offset, vt, align: int):
    """<vt> at base + offset elements of base's type (unaligned as ``align`` says)."""
    return builder.load(builder.bitcast(builder.gep(base, [offset]), vt.as_pointer()), align=align)


def _row_pointer(builder, array, row, element):
    """Pointer to row ``row`` of a 2-D array struct, as ``element``*."""
    stride = cgutils.unpack_tuple(builder, array.strides)[0]
    raw = builder.gep(builder.bitcast(array.data, I8.as_pointer()), [builder.mul(row, stride)])
    return builder.bitcast(raw, element.as_pointer())


def _half_to_float(builder, bits):
    return builder.fpext(builder.bitcast(bits, F16), F32)


# Bytes ahead of a row's current block that the int4 loops prefetch, and into which cache level. Streaming
# int4 Mixtral-8x7B rows from memory (4096 x 14336 and 28672 x 4096) ran 1.4-1.5x faster with 4096 bytes
# ahead on one thread (2048: 1.3x, 8192: less) and 1.47-1.65x on two. Into L2 only (``prefetcht1``), not L1:
# a prefetch into L1 evicts the activation codes the row meets (28 KB of int16 codes for a 14336-wide row,
# most of a 32 KB L1), and the 14336-wide rows then streamed at 16.7 GB/s against 23.6 into L2 (28672 x 4096:
# 27.7 against 30.5), both threads, side by side in one process (znver4). The int8 loops (twice the bytes per
# weight) lose with a prefetch on 4096-wide rows (42 against 38 GB/s) and gain on 14336-wide ones (16 against
# 21): they prefetch PREFETCH_INT8 bytes ahead on rows of at least WIDE_ROW inputs only.
PREFETCH = 4096
PREFETCH_INT8 = 8192
PREFETCH_LEVEL = 2          # llvm.prefetch locality: 3 = prefetcht0 (L1), 2 = prefetcht1 (L2)
WIDE_ROW = 8192             # inputs per row from which the int8 loops prefetch (int16 codes: 16 KB, half an L1)


def _prefetch(builder, pointer):
    """A read prefetch of ``pointer``'s cache line into L2 (``llvm.prefetch`` locality PREFETCH_LEVEL:
    ``prefetcht1``)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(pointer, I8.as_pointer()), ir.Constant(I32, 0), ir.Constant(I32, PREFETCH_LEVEL),
                      ir.Constant(I32, 1)])


def _block_accumulate(builder, facc, sums, scale):
    """facc += float(sums) * scale (16 lanes)."""
    lanes = builder.sitofp(sums, _vec(F32, LANES // 2))
    builder.store(builder.fadd(builder.load(facc), builder.fmul(lanes, _splat(builder, scale, LANES // 2))), facc)


def _require(array, dtype, ndim: int, name: str) -> None:
    if not (isinstance(array, types.Array) and array.dtype == dtype and array.ndim == ndim and array.layout == "C"):
        raise TypingError(f"{name} must be a C-contiguous {ndim}-D {dtype} array, got {array}")


def _padded_tail(builder, sources, count, intp):
    """Zero-filled stack copies of ``count`` (< the buffer's lanes) elements at each (pointer, vector type) of
    ``sources``: the short last block then runs the full-block body, its missing lanes multiplying 0."""
    copies = []
    for pointer, vt in sources:
        buffer = cgutils.alloca_once(builder, vt)
        builder.store(ir.Constant(vt, None), buffer)
        flat = builder.bitcast(buffer, vt.element.as_pointer())
        with cgutils.for_range(builder, count) as loop:
            builder.store(builder.load(builder.gep(pointer, [loop.index])), builder.gep(flat, [loop.index]))
        copies.append(flat)
    return copies


def _row_blocks(builder, intp, width, per_block: int, body, tail: bool):
    """body(b, j0, tail, chain) for each block of a row ``width`` elements wide (``per_block`` per block;
    j0 its first element, tail None or a short last block's element count; that block only with ``tail``: it
    costs the full blocks' loop 10-25% when present, so rows without one compile without it). Blocks alternate between two
    accumulator chains (0 and 1), so consecutive blocks' float additions do not wait on each other."""
    step, one = ir.Constant(intp, per_block), ir.Constant(intp, 1)
    full = builder.udiv(width, step)
    with cgutils.for_range(builder, builder.lshr(full, one)) as loop:
        b = builder.shl(loop.index, one)
        body(b, builder.mul(b, step), None, 0)
        b = builder.add(b, one)
        body(b, builder.mul(b, step), None, 1)
    with builder.if_then(builder.trunc(full, ir.IntType(1)), likely=False):      # an odd count: the last one
        b = builder.sub(full, one)
        body(b, builder.mul(b, step), None, 0)
    if tail:
        count = builder.urem(width, step)
        with builder.if_then(builder.icmp_unsigned("!=", count, ir.Constant(intp, 0)), likely=False):
            body(full, builder.mul(full, step), count, 1)


def _accumulators(builder, value, chains: int = 2):
    return [cgutils.alloca_once_value(builder, value) for _ in range(chains)]


def _sum_chains(builder, accumulators):
    total = builder.load(accumulators[0])
    for accumulator in accumulators[1:]:
        total = builder.fadd(total, builder.load(accumulator))
    return total


def _arrays(context, builder, signature, args, indices):
    """The array structs of the intrinsic's arguments at ``indices``."""
    return [context.make_array(signature.args[i])(context, builder, args[i]) for i in indices]


def _float_lanes(builder):
    """Two zeroed accumulator chains of LANES // 2 float32 lanes."""
    return _accumulators(builder, ir.Constant(_vec(F32, LANES // 2), [0.0] * (LANES // 2)))


CHUNK = 16                 # int4 blocks whose scales are computed as one vector (groups of 64 or 128 inputs)


class _Int4Scales:
    """The per-block factors of an int4 row: block b's integer (or float) sum is scaled by
    d[b] = scale[g] (times xs[b], the activation's block scale, for "-a8"), and the zero point adds
    -d[b] * zero[g] * xsum[b] per block. Full chunks of CHUNK blocks compute d and the zero term as one
    vector each (groups of 64 or 128 inputs: g = b or b >> 1) and read d[b] back as a broadcast; the
    rest, and other group sizes, compute them per block."""

    def __init__(self, builder, intp, scales, zeros, shift, xs, xsum, xsum_is_int: bool):
        self.builder, self.intp = builder, intp
        self.scales, self.zeros, self.shift, self.xs, self.xsum = scales, zeros, shift, xs, xsum
        self.xsum_is_int = xsum_is_int
        self.factors = cgutils.alloca_once(builder, _vec(F32, CHUNK))              # d of the current chunk
        self.offsets = _accumulators(builder, ir.Constant(F32, 0.0))              # per-block zero terms
        self.chunk_offset = cgutils.alloca_once_value(builder, ir.Constant(_vec(F32, CHUNK), [0.0] * CHUNK))

    def _group_bits(self, pointer, first_block):
        """<CHUNK x i16> of the float16 bits of blocks first_block.. (g = b or b >> 1)."""
        builder = self.builder
        result = cgutils.alloca_once(builder, _vec(I16, CHUNK))
        with builder.if_else(builder.icmp_unsigned("==", self.shift, ir.Constant(self.intp, 0))) as (same, halved):
            with same:
                builder.store(_load_vector(builder, pointer, first_block, _vec(I16, CHUNK), 2), result)
            with halved:
                pairs = _load_vector(builder, pointer, builder.lshr(first_block, ir.Constant(self.intp, 1)),
                                     _vec(I16, CHUNK // 2), 2)
                builder.store(builder.shuffle_vector(pairs, pairs, _indices(i // 2 for i in range(CHUNK))), result)
        return builder.load(result)

    def chunks(self, full):
        """Full chunks of ``full`` blocks that take the vector path (none unless groups are 64 or 128)."""
        builder = self.builder
        vector = builder.icmp_unsigned("<=", self.shift, ir.Constant(self.intp, 1))
        return builder.select(vector, builder.udiv(full, ir.Constant(self.intp, CHUNK)), ir.Constant(self.intp, 0))

    def start_chunk(self, first_block):
        builder = self.builder
        halves = _vec(F16, CHUNK)
        scale = builder.fpext(builder.bitcast(self._group_bits(self.scales, first_block), halves), _vec(F32, CHUNK))
        zero = builder.fpext(builder.bitcast(self._group_bits(self.zeros, first_block), halves), _vec(F32, CHUNK))
        if self.xs is not None:
            scale = builder.fmul(scale, _load_vector(builder, self.xs, first_block, _vec(F32, CHUNK), 4))
        xsum = _load_vector(builder, self.xsum, first_block, _vec(I32 if self.xsum_is_int else F32, CHUNK), 4)
        if self.xsum_is_int:
            xsum = builder.sitofp(xsum, _vec(F32, CHUNK))
        builder.store(scale, self.factors)
        term = builder.fmul(scale, builder.fmul(zero, xsum))
        builder.store(builder.fadd(builder.load(self.chunk_offset), term), self.chunk_offset)

    def in_chunk(self, k):
        """d of in-chunk block k (start_chunk ran)."""
        flat = self.builder.bitcast(self.factors, F32.as_pointer())
        return self.builder.load(self.builder.gep(flat, [k]))

    def per_block(self, b, chain):
        """d of block b, computed alone; its zero term goes to chain ``chain``."""
        builder = self.builder
        g = builder.lshr(b, self.shift)
        factor = _half_to_float(builder, builder.load(builder.gep(self.scales, [g])))
        if self.xs is not None:
            factor = builder.fmul(builder.load(builder.gep(self.xs, [b])), factor)
        xsum = builder.load(builder.gep(self.xsum, [b]))
        if self.xsum_is_int:
            xsum = builder.sitofp(xsum, F32)
        shift = builder.fmul(_half_to_float(builder, builder.load(builder.gep(self.zeros, [g]))), xsum)
        offset = self.offsets[chain]
        builder.store(builder.fadd(builder.load(offset), builder.fmul(factor, shift)), offset)
        return factor

    def total_offset(self):
        return self.builder.fadd(_sum_chains(self.builder, self.offsets), _hsum(self.builder, self.builder.load(self.chunk_offset)))


def _int4_row(builder, intp, half, factors: _Int4Scales, body, tail: bool):
    """body(b, j0, tail, chain, factor) over an int4 row's blocks (LANES bytes each): full chunks of CHUNK
    blocks with vector factors, then the blocks left and a short last block (with ``tail``) one by one."""
    step, one = ir.Constant(intp, LANES), ir.Constant(intp, 1)
    full = builder.udiv(half, step)
    chunks = factors.chunks(full)
    with cgutils.for_range(builder, chunks) as chunk:
        first = builder.mul(chunk.index, ir.Constant(intp, CHUNK))
        factors.start_chunk(first)
        with cgutils.for_range(builder, ir.Constant(intp, CHUNK // 2)) as pair:
            k = builder.shl(pair.index, one)
            b = builder.add(first, k)
            body(b, builder.mul(b, step), None, 0, factors.in_chunk(k))
            k, b = builder.add(k, one), builder.add(b, one)
            body(b, builder.mul(b, step), None, 1, factors.in_chunk(k))
    done = builder.mul(chunks, ir.Constant(intp, CHUNK))
    with cgutils.for_range_slice(builder, done, full, one) as (b, _):
        chain = 0
        body(b, builder.mul(b, step), None, chain, factors.per_block(b, chain))
    if tail:
        count = builder.urem(half, step)
        with builder.if_then(builder.icmp_unsigned("!=", count, ir.Constant(intp, 0)), likely=False):
            body(full, builder.mul(full, step), count, 1, factors.per_block(full, 1))


def _q8_intrinsic(tail: bool):
    @intrinsic
    def q8_blocks_dot(typingctx, q, r, xq, xs):
        """Row r of int8 codes q [R, K] . int16 activation codes xq [K], block b scaled by xs[b] (with ``tail``
        a short last block included, else full blocks only)."""
        _require(q, types.int8, 2, "q")
        _require(xq, types.int16, 1, "xq")
        _require(xs, types.float32, 1, "xs")
        form = simd_form()
        sig = types.float32(q, r, xq, xs)

        def codegen(context, builder, signature, args):
            row = args[1]
            qa, xqa, xsa = _arrays(context, builder, signature, args, (0, 2, 3))
            intp = row.type
            width = cgutils.unpack_tuple(builder, qa.shape)[1]
            codes = _row_pointer(builder, qa, row, I8)
            faccs = _float_lanes(builder)
            bytes_t, words_t = _vec(I8, LANES), _vec(I16, LANES)
            second = ir.Constant(intp, LANES)
            wide = builder.icmp_unsigned(">=", width, ir.Constant(intp, WIDE_ROW))

            def block(b, k0, tail, chain):
                w, x = builder.gep(codes, [k0]), builder.gep(xqa.data, [k0])
                if tail is not None:
                    w, x = _padded_tail(builder, [(w, _vec(I8, 2 * LANES)), (x, _vec(I16, 2 * LANES))], tail, intp)
                else:
                    with builder.if_then(wide):               # loop-invariant: LLVM unswitches the row loop
                        _prefetch(builder, builder.gep(w, [ir.Constant(intp, PREFETCH_INT8)]))
                zero = ir.Constant(intp, 0)
                w0 = builder.sext(_load_vector(builder, w, zero, bytes_t, 1), words_t)
                w1 = builder.sext(_load_vector(builder, w, second, bytes_t, 1), words_t)
                sums = builder.add(_madd(builder, w0, _load_vector(builder, x, zero, words_t, 2), form),
                                   _madd(builder, w1, _load_vector(builder, x, second, words_t, 2), form))
                _block_accumulate(builder, faccs[chain], sums, builder.load(builder.gep(xsa.data, [b])))

            _row_blocks(builder, intp, width, 2 * LANES, block, tail)
            return _hsum(builder, _sum_chains(builder, faccs))
        return sig, codegen
    return q8_blocks_dot


def _q4_intrinsic(tail: bool):
    @intrinsic
    def q4_blocks_dot(typingctx, q, r, scale, zero, group_shift, xq, xs, xsum):
        """Row r of int4 bytes q [R, K/2] (low nibble: input 2j, high: 2j + 1) . the activation's codes xq [K],
        deinterleaved (xq[:K/2] the even inputs, xq[K/2:] the odd ones); float16-bit scale / zero [R, K/G],
        2 ** group_shift = G / ACT_BLOCK blocks per weight group (shifted, not divided: a division per block is
        slow); block b scaled by xs[b], its code sum xsum[b] (with ``tail`` a short last block included)."""
        _require(q, types.uint8, 2, "q")
        _require(scale, types.int16, 2, "scale")
        _require(zero, types.int16, 2, "zero")
        _require(xq, types.int16, 1, "xq")
        _require(xs, types.float32, 1, "xs")
        _require(xsum, types.int32, 1, "xsum")
        form = simd_form()
        sig = types.float32(q, r, scale, zero, group_shift, xq, xs, xsum)

        def codegen(context, builder, signature, args):
            row = args[1]
            qa, sa, za, xqa, xsa, xsuma = _arrays(context, builder, signature, args, (0, 2, 3, 5, 6, 7))
            intp = row.type
            group_shift_v = context.cast(builder, args[4], signature.args[4], types.intp)
            half = cgutils.unpack_tuple(builder, qa.shape)[1]
            even, odd = xqa.data, builder.gep(xqa.data, [half])          # xq = [even inputs | odd inputs]
            codes = _row_pointer(builder, qa, row, I8)
            factors = _Int4Scales(builder, intp, _row_pointer(builder, sa, row, I16), _row_pointer(builder, za, row, I16),
                                  group_shift_v, xsa.data, xsuma.data, xsum_is_int=True)
            faccs = _float_lanes(builder)
            bytes_t, words_t = _vec(I8, LANES), _vec(I16, LANES)
            first = ir.Constant(intp, 0)

            def block(b, j0, tail, chain, factor):
                w, xe, xo = builder.gep(codes, [j0]), builder.gep(even, [j0]), builder.gep(odd, [j0])
                if tail is not None:
                    w, xe, xo = _padded_tail(builder, [(w, bytes_t), (xe, words_t), (xo, words_t)], tail, intp)
                else:
                    _prefetch(builder, builder.gep(w, [ir.Constant(intp, PREFETCH)]))
                packed = builder.zext(_load_vector(builder, w, first, bytes_t, 1), words_t)
                low = builder.and_(packed, ir.Constant(words_t, [15] * LANES))
                high = builder.lshr(packed, ir.Constant(words_t, [4] * LANES))
                sums = builder.add(_madd(builder, low, _load_vector(builder, xe, first, words_t, 2), form),
                                   _madd(builder, high, _load_vector(builder, xo, first, words_t, 2), form))
                _block_accumulate(builder, faccs[chain], sums, factor)

            _int4_row(builder, intp, half, factors, block, tail)
            return builder.fsub(_hsum(builder, _sum_chains(builder, faccs)), factors.total_offset())
        return sig, codegen
    return q4_blocks_dot


def _contract(instruction):
    """Let LLVM fuse this multiply or add with its neighbour (an FMA)."""
    instruction.flags.append("contract")
    return instruction


def _q4f_intrinsic(tail: bool):
    @intrinsic
    def q4f_blocks_dot(typingctx, q, r, scale, zero, group_shift, x, xsum):
        """Row r of int4 bytes q [R, K/2] . float32 inputs x [K], deinterleaved (x[:K/2] the even inputs, x[K/2:]
        the odd ones), weight-only: sum_b scale[g] * (sum_j lo_j * x_even_j + hi_j * x_odd_j - zero[g] * xsum[b])
        with xsum [NB] the sums of x over each block of ACT_BLOCK inputs, g = b >> group_shift (with ``tail``
        a short last block included). Codes widen to int32 and convert to float32 (``vpmovzxbd`` +
        ``vcvtdq2ps``); products accumulate in float32 lanes, one horizontal sum per row."""
        _require(q, types.uint8, 2, "q")
        _require(scale, types.int16, 2, "scale")
        _require(zero, types.int16, 2, "zero")
        _require(x, types.float32, 1, "x")
        _require(xsum, types.float32, 1, "xsum")
        sig = types.float32(q, r, scale, zero, group_shift, x, xsum)

        def codegen(context, builder, signature, args):
            row = args[1]
            qa, sa, za, xa, xsuma = _arrays(context, builder, signature, args, (0, 2, 3, 5, 6))
            intp = row.type
            group_shift_v = context.cast(builder, args[4], signature.args[4], types.intp)
            half = cgutils.unpack_tuple(builder, qa.shape)[1]
            even, odd = xa.data, builder.gep(xa.data, [half])
            codes = _row_pointer(builder, qa, row, I8)
            factors = _Int4Scales(builder, intp, _row_pointer(builder, sa, row, I16), _row_pointer(builder, za, row, I16),
                                  group_shift_v, None, xsuma.data, xsum_is_int=False)
            faccs = _float_lanes(builder)
            bytes_t, ints_t, floats_t = _vec(I8, LANES), _vec(I32, LANES), _vec(F32, LANES)
            first = ir.Constant(intp, 0)

            def block(b, j0, tail, chain, factor):
                w, xe, xo = builder.gep(codes, [j0]), builder.gep(even, [j0]), builder.gep(odd, [j0])
                if tail is not None:
                    w, xe, xo = _padded_tail(builder, [(w, bytes_t), (xe, floats_t), (xo, floats_t)], tail, intp)
                else:
                    _prefetch(builder, builder.gep(w, [ir.Constant(intp, PREFETCH)]))
                packed = builder.zext(_load_vector(builder, w, first, bytes_t, 1), ints_t)
                low = builder.sitofp(builder.and_(packed, ir.Constant(ints_t, [15] * LANES)), floats_t)
                high = builder.sitofp(builder.lshr(packed, ir.Constant(ints_t, [4] * LANES)), floats_t)
                products = _contract(builder.fadd(
                    _contract(builder.fmul(low, _load_vector(builder, xe, first, floats_t, 4))),
                    _contract(builder.fmul(high, _load_vector(builder, xo, first, floats_t, 4)))))
                folded = builder.fadd(builder.shuffle_vector(products, products, _indices(range(LANES // 2))),
                                      builder.shuffle_vector(products, products, _indices(range(LANES // 2, LANES))))
                facc = faccs[chain]
                builder.store(_contract(builder.fadd(builder.load(facc), _contract(builder.fmul(
                    folded, _splat(builder, factor, LANES // 2))))), facc)

            _int4_row(builder, intp, half, factors, block, tail)
            return builder.fsub(_hsum(builder, _sum_chains(builder, faccs)), factors.total_offset())
        return sig, codegen
    return q4f_blocks_dot


q8_blocks_dot = _q8_intrinsic(tail=True)          # any row width
q8_full_blocks_dot = _q8_intrinsic(tail=False)    # widths that are a multiple of ACT_BLOCK (64)
q4_blocks_dot = _q4_intrinsic(tail=True)
q4_full_blocks_dot = _q4_intrinsic(tail=False)    # K/2 a multiple of 32
q4f_blocks_dot = _q4f_intrinsic(tail=True)         # int4 weight-only against float32 inputs
q4f_full_blocks_dot = _q4f_intrinsic(tail=False)


def _to_bf16_bits(builder, values):
    """<n x float> -> <n x i16> bfloat16 bits, rounded to nearest even as torch's .to(torch.bfloat16) (a NaN
    stays a quiet NaN)."""
    count = values.type.count
    ints = _vec(I32, count)
    bits = builder.bitcast(values, ints)

    def const(v):
        return ir.Constant(ints, [v] * count)
    upper = builder.lshr(bits, const(16))
    nan = builder.icmp_unsigned(">", builder.and_(bits, const(0x7FFFFFFF)), const(0x7F800000))
    rounded = builder.lshr(builder.add(builder.add(bits, const(0x7FFF)), builder.and_(upper, const(1))), const(16))
    return builder.trunc(builder.select(nan, builder.or_(upper, const(0x40)), rounded), _vec(I16, count))


def _int4_dequant_intrinsic(tail: bool):
    @intrinsic
    def int4_dequant_row(typingctx, q, r, scale, zero, group_shift, low, high):
        """Row r of int4 bytes q [R, K/2] dequantized as packed.dequantize_int4 computes it, (code - zero) *
        scale in float32 (a subtraction, then a multiplication: nothing fused), into low [K/2] (the even
        columns) and high [K/2] (the odd ones): float32, or uint16 bfloat16 bits rounded to nearest even.
        float16-bit scale / zero [R, K/G] with G = ACT_BLOCK << group_shift (with ``tail`` a short last
        block included). 32 bytes per step: ``vpmovzxbd`` + ``vcvtdq2ps``, ``vsubps`` + ``vmulps``, and for
        bfloat16 the rounding in integer lanes and ``vpmovdw``."""
        _require(q, types.uint8, 2, "q")
        _require(scale, types.int16, 2, "scale")
        _require(zero, types.int16, 2, "zero")
        for array, name in ((low, "low"), (high, "high")):
            if not (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
                    and array.dtype in (types.float32, types.uint16)):
                raise TypingError(f"{name} must be a C-contiguous 1-D float32 or uint16 array, got {array}")
        if low.dtype != high.dtype:
            raise TypingError("low and high must have the same dtype")
        bf16 = low.dtype == types.uint16
        sig = types.void(q, r, scale, zero, group_shift, low, high)

        def codegen(context, builder, signature, args):
            row = args[1]
            qa, sa, za, la, ha = _arrays(context, builder, signature, args, (0, 2, 3, 5, 6))
            intp = row.type
            shift_v = context.cast(builder, args[4], signature.args[4], types.intp)
            half = cgutils.unpack_tuple(builder, qa.shape)[1]
            codes = _row_pointer(builder, qa, row, I8)
            scales, zeros = _row_pointer(builder, sa, row, I16), _row_pointer(builder, za, row, I16)
            bytes_t, ints_t, floats_t = _vec(I8, LANES), _vec(I32, LANES), _vec(F32, LANES)
            out_t = _vec(I16, LANES) if bf16 else floats_t
            first = ir.Constant(intp, 0)

            def values(pointer, b):
                g = builder.lshr(b, shift_v)
                zero_v = _splat(builder, _half_to_float(builder, builder.load(builder.gep(zeros, [g]))), LANES)
                scale_v = _splat(builder, _half_to_float(builder, builder.load(builder.gep(scales, [g]))), LANES)
                packed = builder.zext(_load_vector(builder, pointer, first, bytes_t, 1), ints_t)
                out = []
                for nibble in (builder.and_(packed, ir.Constant(ints_t, [15] * LANES)),
                               builder.lshr(packed, ir.Constant(ints_t, [4] * LANES))):
                    v = builder.fmul(builder.fsub(builder.sitofp(nibble, floats_t), zero_v), scale_v)
                    out.append(_to_bf16_bits(builder, v) if bf16 else v)
                return out

            def store(value, array, j0):
                builder.store(value, builder.bitcast(builder.gep(array.data, [j0]), out_t.as_pointer()), align=2)

            step = ir.Constant(intp, LANES)
            full = builder.udiv(half, step)
            with cgutils.for_range(builder, full) as loop:
                j0 = builder.mul(loop.index, step)
                lo, hi = values(builder.gep(codes, [j0]), loop.index)
                store(lo, la, j0)
                store(hi, ha, j0)
            if tail:
                count = builder.urem(half, step)
                with builder.if_then(builder.icmp_unsigned("!=", count, ir.Constant(intp, 0)), likely=False):
                    j0 = builder.mul(full, step)
                    (padded,) = _padded_tail(builder, [(builder.gep(codes, [j0]), bytes_t)], count, intp)
                    lo, hi = values(padded, full)
                    for value, array in ((lo, la), (hi, ha)):
                        buffer = cgutils.alloca_once(builder, out_t)
                        builder.store(value, buffer)
                        flat = builder.bitcast(buffer, out_t.element.as_pointer())
                        with cgutils.for_range(builder, count) as k:
                            target = builder.gep(array.data, [builder.add(j0, k.index)])
                            builder.store(builder.load(builder.gep(flat, [k.index])), target)
            return context.get_dummy_value()
        return sig, codegen
    return int4_dequant_row


int4_dequant_row = _int4_dequant_intrinsic(tail=True)
int4_dequant_full_row = _int4_dequant_intrinsic(tail=False)


FP8_SCALE_SHIFT = 2        # log2(FP8_BLOCK / LANES): steps of LANES columns per scale block of 128


def _fp8_intrinsic(tail: bool):
    @intrinsic
    def fp8_blocks_dot(typingctx, q, r, scale_row, x):
        """Row r of float8_e4m3fn codes q [R, K] . float32 inputs x [K], column block c (128 columns) times
        scale_row[c]: the row's block-row of scales (with ``tail`` a short last step included). The codes
        decode in integer lanes as packed_kernels._fp8_decode_cols does (normal values by shifting the
        magnitude bits into a float32's exponent and mantissa, subnormals as magnitude * 2^-9, the NaN codes
        NaN, the sign bit moved over), 32 a step, then meet x in float32 lanes; one horizontal sum per row."""
        _require(q, types.uint8, 2, "q")
        _require(scale_row, types.float32, 1, "scale_row")
        _require(x, types.float32, 1, "x")
        sig = types.float32(q, r, scale_row, x)

        def codegen(context, builder, signature, args):
            row = args[1]
            qa, sa, xa = _arrays(context, builder, signature, args, (0, 2, 3))
            intp = row.type
            width = cgutils.unpack_tuple(builder, qa.shape)[1]
            codes = _row_pointer(builder, qa, row, I8)
            faccs = _float_lanes(builder)
            bytes_t, ints_t, floats_t = _vec(I8, LANES), _vec(I32, LANES), _vec(F32, LANES)
            first = ir.Constant(intp, 0)

            def const(v):
                return ir.Constant(ints_t, [v] * LANES)

            def step(b, j0, tail, chain, factor):
                w, xs = builder.gep(codes, [j0]), builder.gep(xa.data, [j0])
                if tail is not None:
                    w, xs = _padded_tail(builder, [(w, bytes_t), (xs, floats_t)], tail, intp)
                packed = builder.zext(_load_vector(builder, w, first, bytes_t, 1), ints_t)
                magnitude = builder.and_(packed, const(127))
                normal = builder.bitcast(builder.add(builder.shl(magnitude, const(20)), const(120 << 23)), floats_t)
                subnormal = builder.fmul(builder.sitofp(magnitude, floats_t),
                                         ir.Constant(floats_t, [2.0 ** -9] * LANES))
                value = builder.select(builder.icmp_unsigned("<", magnitude, const(8)), subnormal, normal)
                value = builder.select(builder.icmp_unsigned("==", magnitude, const(127)),
                                       ir.Constant(floats_t, [float("nan")] * LANES), value)
                sign = builder.shl(builder.and_(packed, const(128)), const(24))
                value = builder.bitcast(builder.xor(builder.bitcast(value, ints_t), sign), floats_t)
                products = _contract(builder.fmul(value, _load_vector(builder, xs, first, floats_t, 4)))
                folded = builder.fadd(builder.shuffle_vector(products, products, _indices(range(LANES // 2))),
                                      builder.shuffle_vector(products, products, _indices(range(LANES // 2, LANES))))
                facc = faccs[chain]
                builder.store(_contract(builder.fadd(builder.load(facc), _contract(builder.fmul(
                    folded, _splat(builder, factor, LANES // 2))))), facc)

            def block(b, j0, tail, chain):
                column_block = builder.lshr(b, ir.Constant(intp, FP8_SCALE_SHIFT))
                step(b, j0, tail, chain, builder.load(builder.gep(sa.data, [column_block])))

            _row_blocks(builder, intp, width, LANES, block, tail)
            return _hsum(builder, _sum_chains(builder, faccs))
        return sig, codegen
    return fp8_blocks_dot


fp8_blocks_dot = _fp8_intrinsic(tail=True)
fp8_full_blocks_dot = _fp8_intrinsic(tail=False)
