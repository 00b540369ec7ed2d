"""The Triton kernels of the three fastmerge primitives (imported only when triton is).

Layout shared by the three kernels:
- Up to ``MAX_MODELS`` models (and as many second moments) travel as separate pointer
  arguments ``m0 .. m31`` / ``v0 .. v31``; Triton specialises each pointer on its own dtype,
  so any mix of bf16/fp16/fp32 compiles to direct typed loads (no pointer tables, nothing
  hidden from torch.compile's mutation analysis). Unused slots get a dummy (models[0]).
  Inside the kernel the slots form a tuple indexed by the ``tl.static_range`` loop variable
  (a compile-time constant), so the loop over the N models unrolls and each iteration reads
  its own pointer.
- Everything is loaded, converted to float32 and computed in float32 (the interpreter
  mishandles bf16 arithmetic, and docs/semantics.md asks for float32 arithmetic anyway).
- Element indices are int64 (``program_id`` widened before the multiply): > 2^31 elements.
- Per-model packed parameters are read in the kernel (fparams [N, 6] f32, iparams [N, 3]
  i64), so the host never synchronises on them.
- Every float32 operation is rounded on its own, as in the interpreter, the C++ CPU kernels
  and the CUDA kernels (csrc builds with -ffp-contract=off): products that feed a sum go
  through ``_mul`` (``mul.rn``, which the compiler never contracts into an FMA, whatever the
  launch's enable_fp_fusion) and quotients through ``tl.div_rn`` (not ``div.full``).
- Nothing a kernel adds across programs depends on their order: the model statistics are
  per-program partials summed by torch in a fixed order, the histogram counts are integers,
  the magnitude histograms' float64 sums are exact (the values of one bin share their
  exponent), and the Fisher histograms add |t| as exact integer limbs (``_add_limbs``).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ... import abi

MAX_MODELS = abi.MAX_MODELS

# The kernel ABI (fastmerge.abi, generated from csrc/common/fastmerge_params.h) as constexprs:
# a module global that a @triton.jit function reads must be one.
MODE_KEEP_ALL = tl.constexpr(abi.MODE_KEEP_ALL)
MODE_BAND = tl.constexpr(abi.MODE_BAND)
MODE_DARE = tl.constexpr(abi.MODE_DARE)
SCORE_FISHER = tl.constexpr(abi.SCORE_FISHER)
COMBINE_LINEAR = tl.constexpr(abi.COMBINE_LINEAR)
COMBINE_SUM = tl.constexpr(abi.COMBINE_SUM)
COMBINE_CONSENSUS_SUM = tl.constexpr(abi.COMBINE_CONSENSUS_SUM)
COMBINE_CONSENSUS_TIES = tl.constexpr(abi.COMBINE_CONSENSUS_TIES)
COMBINE_OTA = tl.constexpr(abi.COMBINE_OTA)
ELECT_SUM = tl.constexpr(abi.ELECT_SUM)
ELECT_WEIGHTED = tl.constexpr(abi.ELECT_WEIGHTED)
NORMALIZE_NONE = tl.constexpr(abi.NORMALIZE_NONE)
NORMALIZE_WEIGHTS = tl.constexpr(abi.NORMALIZE_WEIGHTS)
NORMALIZE_COUNT = tl.constexpr(abi.NORMALIZE_COUNT)
F_WEIGHT = tl.constexpr(abi.F_WEIGHT)
F_RESCALE = tl.constexpr(abi.F_RESCALE)
F_LO = tl.constexpr(abi.F_LO)
F_HI = tl.constexpr(abi.F_HI)
F_CONSENSUS_LAMBDA = tl.constexpr(abi.F_CONSENSUS_LAMBDA)
F_OTA_SCALE = tl.constexpr(abi.F_OTA_SCALE)
NUM_FPARAMS = tl.constexpr(abi.NUM_FPARAMS)
I_MODE = tl.constexpr(abi.I_MODE)
I_DARE_KEY = tl.constexpr(abi.I_DARE_KEY)
I_DARE_THRESHOLD = tl.constexpr(abi.I_DARE_THRESHOLD)
NUM_IPARAMS = tl.constexpr(abi.NUM_IPARAMS)
RADIX_BITS = tl.constexpr(abi.RADIX_BITS)
NUM_BINS = tl.constexpr(abi.NUM_BINS)

# Philox4x32-10 constants (Salmon et al. 2011), as in fastmerge/methods/rng.py.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds on uint32 words (tensors or scalars); returns 4 uint32 words.

    One round: (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2;
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped by (W0, W1) between rounds.
    """
    for rnd in tl.static_range(10):
        if rnd > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def philox_dare_word(j, key):
    """The DARE word of int64 element indices ``j`` under the 64-bit key ``key`` (int64 bits),
    semantics v2: word ``j & 3`` of Philox(counter (lo32(c), hi32(c), 0, 0), key (lo32(key),
    hi32(key))) with ``c = j >> 2``."""
    c = j >> 2
    c0 = c.to(tl.uint32)
    c1 = (c >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    k0 = key.to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    w = j & 3
    return tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))


@triton.jit
def _philox_kat_kernel(ctr_ptr, key_ptr, out_ptr, BLOCK: tl.constexpr):
    """Test kernel: out[b, :] = Philox4x32-10(ctr[b, :], key[b, :]) (uint32 words in int64)."""
    rows = tl.arange(0, BLOCK)
    c0 = tl.load(ctr_ptr + rows * 4 + 0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + rows * 4 + 1).to(tl.uint32)
    c2 = tl.load(ctr_ptr + rows * 4 + 2).to(tl.uint32)
    c3 = tl.load(ctr_ptr + rows * 4 + 3).to(tl.uint32)
    k0 = tl.load(key_ptr + rows * 2 + 0).to(tl.uint32)
    k1 = tl.load(key_ptr + rows * 2 + 1).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + rows * 4 + 0, r0.to(tl.int64))
    tl.store(out_ptr + rows * 4 + 1, r1.to(tl.int64))
    tl.store(out_ptr + rows * 4 + 2, r2.to(tl.int64))
    tl.store(out_ptr + rows * 4 + 3, r3.to(tl.int64))


@triton.jit
def _philox_stream_kernel(out_ptr, key, start, n, BLOCK: tl.constexpr):
    """Test kernel: out[j] = philox_dare_word(start + j, key) as int64 in [0, 2^32)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    r = philox_dare_word(offs + start, key)
    tl.store(out_ptr + offs, r.to(tl.int64), mask=msk)


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _finite(x):
    """x is neither Inf nor NaN (exponent bits not all ones)."""
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000


@triton.jit
def _score(t, v, SCORE: tl.constexpr):
    """The float32 selection score with the sign bit cleared: |t| or t*t*v."""
    if SCORE == SCORE_FISHER:
        s = (t * t) * v
    else:
        s = t
    return s.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _load_t(base, mptr, offs, msk, HAS_BASE: tl.constexpr):
    x = tl.load(mptr + offs, mask=msk, other=0.0).to(tl.float32)
    if HAS_BASE:
        x = x - tl.load(base + offs, mask=msk, other=0.0).to(tl.float32)
    return x


@triton.jit
def _load_v(vptr, offs, msk, HAS_V: tl.constexpr):
    if HAS_V:
        v = tl.load(vptr + offs, mask=msk, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(offs.shape, tl.float32)
    return v


@triton.jit
def _vpow(v, power, INTERP: tl.constexpr):
    """max(v, 0) ^ power in float32. On a GPU: libdevice powf (<= 2 ulp). The interpreter has
    no libdevice, so there: exp2(p * log2(v)) in float64, rounded once to float32."""
    x = tl.maximum(v, 0.0)
    if INTERP:
        x64 = x.to(tl.float64)
        pos = x64 > 0.0
        y = tl.exp2(power * tl.log2(tl.where(pos, x64, 1.0)))
        at_zero = 1.0 if power == 0.0 else (0.0 if power > 0.0 else float("inf"))
        y = tl.where(pos, y, at_zero).to(tl.float32)
    else:
        y = libdevice.pow(x, power)
    return y


@triton.jit
def _keep(t, v, j, i, fp, ip, SCORE: tl.constexpr):
    """Keep mask of model i (mode of iparams[i]): 0 all, 1 band lo <= score < hi, 2 none,
    3 DARE philox_dare_word(j, key) < threshold (semantics v2: word j & 3 of counter j >> 2)."""
    mode = tl.load(ip + i * NUM_IPARAMS + I_MODE)
    if mode == MODE_BAND:
        bits = _score(t, v, SCORE)
        s = bits.to(tl.float32, bitcast=True)
        lo = tl.load(fp + i * NUM_FPARAMS + F_LO)
        hi = tl.load(fp + i * NUM_FPARAMS + F_HI)
        hi_inf = hi.to(tl.int32, bitcast=True) == 0x7F800000
        keep = (s >= lo) & ((s < hi) | hi_inf)
    elif mode == MODE_DARE:
        key = tl.load(ip + i * NUM_IPARAMS + I_DARE_KEY)
        thr = tl.load(ip + i * NUM_IPARAMS + I_DARE_THRESHOLD)
        r = philox_dare_word(j, key)
        keep = r.to(tl.int64) < thr
    else:
        keep = (j >= 0) & (mode == MODE_KEEP_ALL)
    return keep


@triton.jit
def _mul(a, b, INTERP: tl.constexpr):
    """a * b rounded on its own (mul.rn.f32: never contracted into an FMA with a following
    add). The interpreter has no libdevice and never contracts."""
    if INTERP:
        r = a * b
    else:
        r = libdevice.mul_rn(a, b)
    return r


@triton.jit
def _count_nonfinite(x, msk, nonfinite, i):
    bad = tl.sum((msk & ~_finite(x)).to(tl.int32), axis=0)
    if bad > 0:
        tl.atomic_add(nonfinite + i, bad.to(tl.int64))


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


# ----------------------------------------------------------------------------- histogram
@triton.jit
def _segment_sum(b1, c1, s1, b2, c2, s2):
    """Segmented-scan combine over runs of equal bins (keys are sorted, runs contiguous)."""
    same = b1 == b2
    return b2, c2 + tl.where(same, c1, 0), s2 + tl.where(same, s1, 0.0)


@triton.jit
def _segment_count(b1, c1, b2, c2):
    """Segmented count of a forward scan: elements of the current run so far."""
    return b2, c2 + tl.where(b1 == b2, c1, 0)


# Fisher histograms add |t| as an exact integer: a finite float32 is mant * 2^(shift - 149)
# with a 24-bit mant, i.e. at most two 28-bit limbs of a 280-bit fixed-point number; int64
# limb atomics are order-free (exact up to 2^35 additions per limb) and the host turns the
# limbs into float64 once (torch, fixed order).
LIMB_BITS = tl.constexpr(28)
LIMB_MASK = tl.constexpr(0xFFFFFFF)
NUM_LIMBS = tl.constexpr(10)


@triton.jit
def _add_limbs(limbs, sums, dst, mag, sel):
    """limbs[dst, :] += |t| as fixed-point limbs; non-finite |t| (Inf, NaN) go straight to the
    float64 sums, where adding them is order-free too."""
    bits = mag.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    e = bits >> 23
    finite = e < 255
    mant = (bits & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    shift = tl.maximum(e - 1, 0)
    limb = shift // LIMB_BITS
    v = mant.to(tl.int64) << (shift - limb * LIMB_BITS).to(tl.int64)
    lo = v & LIMB_MASK
    hi = v >> LIMB_BITS
    at = dst * NUM_LIMBS + limb.to(tl.int64)
    ok = sel & finite
    tl.atomic_add(limbs + at, lo, mask=ok & (lo != 0))
    tl.atomic_add(limbs + at + 1, hi, mask=ok & (hi != 0))
    tl.atomic_add(sums + dst, mag.to(tl.float64), mask=sel & ~finite)


@triton.jit
def _histogram_add(counts, sums, limbs, row, bins, mag, sel, BLOCK: tl.constexpr,
                   AGGREGATE: tl.constexpr, LIMBS: tl.constexpr):
    """counts[row, bins] += 1 and sums[row, bins] += mag (float64) for the selected lanes.

    LIMBS (the Fisher score, whose bins do not bound |t|): one count atomic per element and
    |t| as exact integer limbs (``_add_limbs``). AGGREGATE=False: one pair of global atomics
    per element. AGGREGATE=True: sort the block by (bin, |t| bits), reduce each run of equal
    bins with segmented scans, and issue one pair of atomics per distinct bin in the block
    (far less same-address contention on a GPU, where magnitudes crowd into a few hundred
    bins). The magnitude score's float64 sums are exact either way (the |t| of one level-0
    bin share their exponent and 7 mantissa bits; level-1 bins hold one value), so they do
    not depend on the order of the additions (up to 2^29 elements per bin)."""
    if LIMBS:
        dst = row * NUM_BINS + bins.to(tl.int64)
        tl.atomic_add(counts + dst, tl.full([BLOCK], 1, tl.int64), mask=sel)
        _add_limbs(limbs, sums, dst, mag, sel)
    elif AGGREGATE:
        magbits = mag.to(tl.int32, bitcast=True).to(tl.int64)
        key = (tl.where(sel, bins, NUM_BINS).to(tl.int64) << 32) | magbits
        ks = tl.sort(key)
        b = (ks >> 32).to(tl.int32)
        m = (ks & 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)
        one = tl.full([BLOCK], 1, tl.int64)
        _, cnt, tot = tl.associative_scan((b, one, m), 0, _segment_sum)
        # the run's last element: 1 element of its run left when counting from the end. A
        # forward scan of the flipped block (not reverse=True: with a non-commutative combine
        # that depends on the order in which Triton's version applies it)
        _, rest = tl.associative_scan((tl.flip(b, 0), one), 0, _segment_count)
        last = (tl.flip(rest, 0) == 1) & (b < NUM_BINS)
        dst = row * NUM_BINS + b.to(tl.int64)
        tl.atomic_add(counts + dst, cnt, mask=last)
        tl.atomic_add(sums + dst, tot, mask=last)
    else:
        dst = row * NUM_BINS + bins.to(tl.int64)
        tl.atomic_add(counts + dst, tl.full([BLOCK], 1, tl.int64), mask=sel)
        tl.atomic_add(sums + dst, mag.to(tl.float64), mask=sel)


@triton.jit
def _score_histogram_kernel(
        base,
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
        m16, m17, m18, m19, m20, m21, m22, m23, m24, m25, m26, m27, m28, m29, m30, m31,
        v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,
        v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27, v28, v29, v30, v31,
        targets, counts, sums, limbs, n,
        N: tl.constexpr, HAS_BASE: tl.constexpr, HAS_V: tl.constexpr, SCORE: tl.constexpr,
        LEVEL: tl.constexpr, AGGREGATE: tl.constexpr, LIMBS: tl.constexpr,
        BLOCK: tl.constexpr):
    """Grid (blocks, T). Row r histograms model targets[r, 0]: level 0 bins the top 16 bits of
    the score; level 1 bins the low 16 bits of the elements whose top 16 bits equal
    targets[r, 1]. counts[r, bin] += 1 and sums[r, bin] += |t| (float64), by atomics (LIMBS:
    limbs[r, bin, :] += |t| as integer limbs instead, for the host to add to sums)."""
    ms = (m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
          m16, m17, m18, m19, m20, m21, m22, m23, m24, m25, m26, m27, m28, m29, m30, m31)
    vs = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,
          v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27, v28, v29, v30, v31)
    pid = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    model = tl.load(targets + row * 2)
    prefix = tl.load(targets + row * 2 + 1)
    bits = tl.zeros([BLOCK], tl.int32)
    mag = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(N):
        if model == i:
            t = _load_t(base, ms[i], offs, msk, HAS_BASE)
            v = _load_v(vs[i], offs, msk, HAS_V)
            bits = _score(t, v, SCORE)
            mag = tl.abs(t)
    if LEVEL == 0:
        bins = bits >> RADIX_BITS
        sel = msk
    else:
        bins = bits & (NUM_BINS - 1)
        sel = msk & ((bits >> RADIX_BITS).to(tl.int64) == prefix)
    _histogram_add(counts, sums, limbs, row, bins, mag, sel, BLOCK, AGGREGATE, LIMBS)


# ----------------------------------------------------------------------------- model stats
@triton.jit
def _model_stats_kernel(
        base,
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
        m16, m17, m18, m19, m20, m21, m22, m23, m24, m25, m26, m27, m28, m29, m30, m31,
        v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,
        v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27, v28, v29, v30, v31,
        fp, ip, partial, n, offset, power,
        N: tl.constexpr, HAS_BASE: tl.constexpr, HAS_V: tl.constexpr, SCORE: tl.constexpr,
        INTERP: tl.constexpr, BLOCK: tl.constexpr):
    """partial[program, i] = (sum |t_i|, sum |t_i| over kept, sum max(v_i, 0)^power) of this
    program's block, float64; the host sums the programs' rows in a fixed order (no float
    atomics, so the same input gives the same bits every run)."""
    ms = (m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
          m16, m17, m18, m19, m20, m21, m22, m23, m24, m25, m26, m27, m28, m29, m30, m31)
    vs = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,
          v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27, v28, v29, v30, v31)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    j = offs + offset
    for i in tl.static_range(N):
        t = _load_t(base, ms[i], offs, msk, HAS_BASE)
        v = _load_v(vs[i], offs, msk, HAS_V)
        keep = _keep(t, v, j, i, fp, ip, SCORE) & msk
        mag = tl.abs(t).to(tl.float64)
        row = partial + (pid * N + i) * 3
        tl.store(row + 0, tl.sum(tl.where(msk, mag, 0.0), axis=0))
        tl.store(row + 1, tl.sum(tl.where(keep, mag, 0.0), axis=0))
        if HAS_V:
            p = _vpow(v, power, INTERP).to(tl.float64)
            tl.store(row + 2, tl.sum(tl.where(msk, p, 0.0), axis=0))


# ----------------------------------------------------------------------------- fused merge
@triton.jit
def _sparsified(base, ms, vs, offs, msk, j, i, fp, ip, HAS_BASE: tl.constexpr,
                HAS_V: tl.constexpr, SCORE: tl.constexpr, INTERP: tl.constexpr):
    """(t_i, v_i, s_i = t_i * keep_i * rescale_i, w_i) of model i."""
    t = _load_t(base, ms[i], offs, msk, HAS_BASE)
    v = _load_v(vs[i], offs, msk, HAS_V)
    keep = _keep(t, v, j, i, fp, ip, SCORE)
    w = tl.load(fp + i * NUM_FPARAMS + F_WEIGHT)
    r = tl.load(fp + i * NUM_FPARAMS + F_RESCALE)
    s = _mul(t * keep.to(tl.float32), r, INTERP)
    return t, v, s, w


@triton.jit
def _fused_merge_kernel(
        base,
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
        m16, m17, m18, m19, m20, m21, m22, m23, m24, m25, m26, m27, m28, m29, m30, m31,
        v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,
        v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27, v28, v29, v30, v31,
        fp, ip, out, nonfinite, n, offset, consensus_k, scale, power, eps,
        N: tl.constexpr, HAS_BASE: tl.constexpr, HAS_V: tl.constexpr, COMBINE: tl.constexpr,
        SCORE: tl.constexpr, ELECT: tl.constexpr, ELECT_ON: tl.constexpr,
        NORMALIZE: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a chunk: every combine of ops.fused_merge_torch, chosen by COMBINE
    (0 linear, 1 sum, 2 ties, 3 consensus_sum, 4 consensus_ties, 5 ota).

    The TIES/consensus variants loop over the models 2-3 times inside one program; the
    re-reads of the same BLOCK elements hit L1/L2, so DRAM sees each input once."""
    ms = (m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
          m16, m17, m18, m19, m20, m21, m22, m23, m24, m25, m26, m27, m28, m29, m30, m31)
    vs = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15,
          v16, v17, v18, v19, v20, v21, v22, v23, v24, v25, v26, v27, v28, v29, v30, v31)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    j = offs + offset
    zero = tl.zeros([BLOCK], tl.float32)

    if COMBINE == COMBINE_LINEAR:
        # linear: sum w_i m_i / (sum w_i if normalize else 1); the base is not read.
        acc = zero
        wsum = _mul(tl.load(fp), 0.0, INTERP)
        for i in tl.static_range(N):
            x = tl.load(ms[i] + offs, mask=msk, other=0.0).to(tl.float32)
            _count_nonfinite(x, msk, nonfinite, i)
            w = tl.load(fp + i * NUM_FPARAMS + F_WEIGHT)
            acc += _mul(w, x, INTERP)
            wsum += w
        if NORMALIZE != NORMALIZE_NONE:
            wsum = tl.where(wsum == 0.0, 1.0, wsum)
            res = tl.div_rn(acc, wsum)
        else:
            res = acc
    else:
        if HAS_BASE:
            b = tl.load(base + offs, mask=msk, other=0.0).to(tl.float32)
        else:
            b = zero
        acc = zero          # sum u_i (sum/ties) or sum W_i s_i (ota)
        den = zero          # sum W_i (ota)
        vote = zero         # sign election
        wsum = _mul(tl.load(fp), 0.0, INTERP)
        for i in tl.static_range(N):
            t, v, s, w = _sparsified(base, ms, vs, offs, msk, j, i, fp, ip, HAS_BASE, HAS_V,
                                     SCORE, INTERP)
            _count_nonfinite(t, msk, nonfinite, i)
            u = _mul(w, s, INTERP)
            if COMBINE == COMBINE_OTA:
                pscale = tl.load(fp + i * NUM_FPARAMS + F_OTA_SCALE)
                big_w = _mul(w, _mul(_vpow(v, power, INTERP), pscale, INTERP) + eps, INTERP)
                acc += _mul(big_w, s, INTERP)
                den += big_w
            else:
                acc += u
                wsum += w
                if ELECT_ON == ELECT_WEIGHTED:
                    e = u
                else:
                    e = s
                if ELECT == ELECT_SUM:
                    vote += e
                else:
                    vote += _sign(e)

        if COMBINE == COMBINE_OTA:
            merged = tl.div_rn(acc, den)
        elif COMBINE == COMBINE_SUM or COMBINE == COMBINE_CONSENSUS_SUM:
            if NORMALIZE == NORMALIZE_WEIGHTS:
                div = wsum
            elif NORMALIZE == NORMALIZE_COUNT:
                div = _mul(wsum, 0.0, INTERP) + N
            else:
                div = _mul(wsum, 0.0, INTERP) + 1.0
            div = tl.where(div == 0.0, 1.0, div)
            merged = tl.div_rn(acc, div)
        else:
            # ties: elect S = sign(vote) (+1 where vote >= 0); keep the agreeing terms
            pos = vote >= 0.0
            merged = zero
            agree_w = zero
            agree_n = zero
            for i in tl.static_range(N):
                t, v, s, w = _sparsified(base, ms, vs, offs, msk, j, i, fp, ip, HAS_BASE,
                                         HAS_V, SCORE, INTERP)
                u = _mul(w, s, INTERP)
                if ELECT_ON == ELECT_WEIGHTED:
                    e = u
                else:
                    e = s
                agree = tl.where(pos, e > 0.0, e < 0.0)
                merged += tl.where(agree, u, 0.0)
                agree_w += tl.where(agree, w, 0.0)
                agree_n += agree.to(tl.float32)
            if NORMALIZE == NORMALIZE_WEIGHTS:
                div = agree_w
            elif NORMALIZE == NORMALIZE_COUNT:
                div = tl.maximum(agree_n, 1.0)
            else:
                div = zero + 1.0
            div = tl.where(div == 0.0, 1.0, div)
            merged = tl.div_rn(merged, div)

        if COMBINE == COMBINE_CONSENSUS_SUM or COMBINE == COMBINE_CONSENSUS_TIES:
            # TALL masks on the raw task vectors: M_i = |t_i| > l_i |t_mtl - t_i|
            votes = tl.zeros([BLOCK], tl.int32)
            for i in tl.static_range(N):
                t = _load_t(base, ms[i], offs, msk, HAS_BASE)
                lam = tl.load(fp + i * NUM_FPARAMS + F_CONSENSUS_LAMBDA)
                votes += (tl.abs(t) > lam * tl.abs(merged - t)).to(tl.int32)
            merged = tl.where(votes >= consensus_k, merged, 0.0)
        res = b + _mul(scale, merged, INTERP)

    tl.store(out + offs, res.to(out.dtype.element_ty), mask=msk)
