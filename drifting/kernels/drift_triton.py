"""Fused Triton implementation of `drifting.drift.drift_loss` (same semantics, same global statistics).

One Triton program handles one problem b (its C_g generated rows against its T = C_g + C_n + C_p targets) and never
writes a [B, C_g, T] tensor to memory: distances, both softmaxes, the affinities and the force coefficients live in
registers. The call makes three passes over the inputs, because the global statistics of the authors' loss are
needed before the next step can start:

    pass 1  per problem: sum_ij w_j d_ij and C_g sum_j w_j         -> scale (a float64 sum over problems / ranks)
    pass 2  per problem and temperature: sum_is F_R^2               -> lambda_R (same)
    pass 3  per problem: F = sum_R F_R / lambda_R (one product, since the force is linear in the coefficients),
            loss_b = mean_is F^2 and d loss_b / d gen = -2 F / (s_in C_g S), written once

Within one call, pass 2 also writes each problem's softmax normalisers in log form (u_i per row, v_j per column and
temperature; [B, R, 2 BG + BN + BP] floats, 3% of the inputs at the 32x32 key), so that pass 3 needs one exponential
per entry and temperature and no softmax reductions: A_ij = exp(l_ij + u_i + v_j). Pass 3 alone (statistics
from a chunked pass, as in training) recomputes them.

Each pass recomputes the distances (one [C_g, S] x [S, T] product). Precision: with bf16 inputs the distance
product runs on bf16 tensor cores with fp32 accumulation, which is exact for the products of bf16 values; in pass 3
the fp32 force coefficients are split into a bf16 high and low part (two products, ~16 mantissa bits), so the force
and the gradient keep about 1e-5 relative accuracy (pass 2 likewise). With other input dtypes every product runs
in full fp32 ("ieee", CUDA-core FMAs, on S tiles of 32), or, with VARIANT["fp32_dot"] = "tf32x3", as three TF32
tensor-core products. Counted in [C_g, S] x [S, T] products, a call costs 1 + (1 + 2R) + (1 + 2) = 11 for R = 3
temperatures, against 1 + R = 4 for a single pass that could keep everything on chip.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from drifting.drift import MIN_SCALE, MIN_SQUARED_DISTANCE, DriftStats
from drifting.kernels import drift_cuda

# The interpreter (TRITON_INTERPRET=1, used to test the kernel on a CPU) cannot multiply bf16 matrices correctly;
# there the products are taken in fp32 after upcasting, which is exact for bf16 values anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_BLOCK_ROWS = 128  # C_g and C_p up to 128 (the paper uses 64 and 128); larger problems use the reference path
MAX_BLOCK_NEG = 64
NORMALIZE_CODE = {"xy": 0, "y": 1, "none": 2}
# Kernel variants (benchmarks/tune_drift_kernel.py --variants): share_norm = pass 2 hands its softmax normalisers
# to pass 3 of the same call; split2 = hi/lo-split force coefficients in pass 2 (bf16 inputs); fp32_dot = how the
# products of fp32 inputs run: "ieee" (CUDA-core FMAs, exact fp32) or "tf32x3" (tensor cores, three TF32 products
# per product: ~21 mantissa bits); fp32_block_s = the S tile width with fp32 inputs. A training step feeds the kernel
# fp32 inputs on 73 of its 86 keys (the mean and std keys), where tiles of 64 spill: compiled for sm_90, 7.7 KB per
# thread in pass 1 and 2.5 KB in passes 2-3, against 0 and 0.2-0.5 KB with tiles of 32
# (`benchmarks/kernel_resources.py --dtype fp32 --block-s 32`; docs/benchmarks.md, sixth sitting). Timed on an H200
# (seventh sitting), a chunk's 86 loss calls in training dtypes: 352 ms at tiles of 64, 144 at 32, 102 with tf32x3,
# which stays opt-in: its statistic `scale` is off by ~2e-5 where the norm expansion cancels (S = 1).
# maxnreg = a cap on registers per thread (0: the compiler's choice, 255 here). Every pass but the first uses all
# 255, so an SM holds two programs of 4 warps; a cap of 168 (three) or 128 (four) trades occupancy for spills
# (compiled for sm_90 at the 32x32 key: 255 registers spill 64-256 bytes per thread in passes 2-3, 168 spill
# 416-704, 128 spill 592-1,008; `python benchmarks/kernel_resources.py --maxnreg N`). Timed on an H200, slower at
# every key (32x32: 28.6 ms uncapped, 33.0 at 168, 35.9 at 128; docs/benchmarks.md, twelfth sitting): opt-in.
# cuda = bf16 problems that fit `drift_cuda.supports` (the 32x32 key) run the CUDA C++ kernel of drift_cuda.cu
# instead (the same math, two roundings apart; inputs staged in shared memory; wgmma on an H100/H200): 12.3 against
# 27.3-29.0 ms at that key on an H100, forward and backward (docs/benchmarks.md, eighteenth sitting); cuda=false keeps
# every pass on Triton.
VARIANT = dict(split2=True, share_norm=True, fp32_dot="ieee", fp32_block_s=32, maxnreg=0, cuda=True)
MAXNREG_CHOICES = (0, 128, 168, 192, 224)


def set_variant(text: str) -> dict:
    """Update VARIANT from "name=value,name=value" (benchmarks' --kernel-variant); returns the new VARIANT. Every
    item is checked before any is applied."""
    new = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in VARIANT or not value:
            raise ValueError(f"kernel variant: expected name=value with a name in {sorted(VARIANT)}, got {item!r}")
        old = VARIANT[name]
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"kernel variant {name}: expected true or false, got {value!r}")
            new[name] = value.lower() in ("true", "1")
        elif name == "maxnreg":
            if not value.isdigit() or int(value) not in MAXNREG_CHOICES:
                raise ValueError(f"kernel variant maxnreg: expected one of {MAXNREG_CHOICES} registers per thread "
                                 f"(0: the compiler's choice), got {value!r}")
            new[name] = int(value)
        elif isinstance(old, int):
            if not value.isdigit() or int(value) not in (16, 32, 64, 128):
                raise ValueError(f"kernel variant {name}: expected a tile width of 16, 32, 64 or 128, got {value!r}")
            new[name] = int(value)
        elif name == "fp32_dot" and value not in ("ieee", "tf32x3"):
            raise ValueError(f"kernel variant fp32_dot: expected 'ieee' or 'tf32x3', got {value!r}")
        else:
            new[name] = value
    VARIANT.update(new)
    return VARIANT


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr, F32DOT: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision=F32DOT)  # "ieee" or "tf32x3" (VARIANT["fp32_dot"])
    else:
        return tl.dot(a, b)


@triton.jit
def _force_dot(coef, y, IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, F32DOT: tl.constexpr):
    """coef [M, K] fp32 @ y [K, N] (bf16 or fp32).

    With bf16 y and SPLIT, coef = hi + lo in bf16 (two products): the coefficients keep ~16 mantissa bits.
    Without SPLIT, one bf16 product (8 bits): only pass 2 may use it (VARIANT["split2"] = False): 1.7 ms less at
    the 32x32 key on an H200, but drift_ms then agrees with the reference only to 1e-4 on calls of few problems
    (1.0e-4 at 9 problems), against ~3e-6 split; off by default.
    """
    if IEEE or UPCAST:
        return _dot(coef, y.to(tl.float32), True, UPCAST, F32DOT)
    elif SPLIT:
        hi = coef.to(tl.bfloat16)
        lo = (coef - hi.to(tl.float32)).to(tl.bfloat16)
        return tl.dot(hi, y) + tl.dot(lo, y)
    else:
        return tl.dot(coef.to(tl.bfloat16), y)


@triton.jit
def _load_rows(ptr, stride_b, stride_r, stride_s, b, rows, n_rows, cols, S):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < S)
    return tl.load(ptr + b * stride_b + rows[:, None] * stride_r + cols[None, :] * stride_s, mask=mask, other=0.0)


@triton.jit
def _affinity(logits, row_max, row_sum, col_max, col_sum, valid, sqrt_floor, NORMALIZE: tl.constexpr):
    """Normalised kernel of one target block from the row/column softmax statistics; padding gets 0.

    For "xy", sqrt(softmax_row * softmax_col) = exp(l - (m_row + m_col) / 2) / sqrt(Z_row Z_col): one exponential
    per entry instead of two and a square root, and no underflow of the product. max(A, sqrt(floor)) equals
    sqrt(max(A^2, floor)) because the square root is monotone.
    """
    if NORMALIZE == 0:
        a = tl.exp(logits - 0.5 * row_max[:, None] - 0.5 * col_max[None, :])
        a = a * (tl.rsqrt(row_sum)[:, None] * tl.rsqrt(col_sum)[None, :])
    elif NORMALIZE == 1:
        a = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
    else:
        a = tl.exp(logits)
    return tl.where(valid, tl.maximum(a, sqrt_floor), 0.0)


@triton.jit
def _log_norm(m, z, valid, NORMALIZE: tl.constexpr, ROW: tl.constexpr):
    """A softmax's normaliser (max m, sum z) in log form: A = exp(l + u_i + v_j) with u = -(m + log z) / 2 for
    "xy" (rows and columns), u = -(m + log z) for "y" (rows; v = 0); 0 on padding."""
    if NORMALIZE == 0:
        out = -0.5 * (m + tl.log(z))
    elif ROW:
        out = -(m + tl.log(z))
    else:
        out = tl.zeros_like(m)
    return tl.where(valid, out, 0.0)


@triton.jit
def _affinity_from_log_norm(logits, u, v, valid, sqrt_floor):
    """`_affinity` from the normalisers of `_log_norm`: max(exp(l_ij + u_i + v_j), sqrt(floor)); padding gets 0."""
    return tl.where(valid, tl.maximum(tl.exp(logits + u[:, None] + v[None, :]), sqrt_floor), 0.0)


@triton.jit
def _drift_kernel(
    gen_ptr, neg_ptr, pos_ptr, wg_ptr, wn_ptr, wp_ptr, temps_ptr, inv_lambda_ptr,
    out_ptr, grad_ptr, params_ptr, norm_ptr,
    sgb, sgr, sgs, snb, snr, sns, spb, spr, sps,
    CG, CN, CP, S, params_stride, lambda_stride,
    sqrt_floor, self_mask, attraction, repulsion, grad_factor,
    PASS: tl.constexpr, R: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_NEG: tl.constexpr, HAS_WG: tl.constexpr, HAS_WN: tl.constexpr, HAS_WP: tl.constexpr,
    BG: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, F32DOT: tl.constexpr, WRITE_GRAD: tl.constexpr, UNROLL_R: tl.constexpr,
    SPLIT2: tl.constexpr, STORE_NORM: tl.constexpr, LOAD_NORM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rg = tl.arange(0, BG)
    rn = tl.arange(0, BN)
    rp = tl.arange(0, BP)
    rs = tl.arange(0, BS)
    valid_g = rg < CG
    valid_n = rn < CN
    valid_p = rp < CP

    # ---- distances d_ij = sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 1e-8)), one block per target group ----------
    acc_gg = tl.zeros((BG, BG), dtype=tl.float32)
    acc_gn = tl.zeros((BG, BN), dtype=tl.float32)
    acc_gp = tl.zeros((BG, BP), dtype=tl.float32)
    sq_g = tl.zeros((BG,), dtype=tl.float32)
    sq_n = tl.zeros((BN,), dtype=tl.float32)
    sq_p = tl.zeros((BP,), dtype=tl.float32)
    # Not software-pipelined (num_stages=1): pipelined, this loop raced on an H200 with bf16 tensor cores (Triton
    # 3.6): a few problems in a thousand got other distances at every launch, under load only. Compiled for sm_90,
    # the pipelined loop writes its tiles to shared memory with cp.async and has the tensor cores (wgmma) read them
    # with no fence.proxy.async between, where the unpipelined one fences (benchmarks/kernel_resources.py).
    # Unpipelined, every pass repeats bit for bit (tests/test_kernels.py, gpu; tests/test_kernels_codegen.py).
    for s0 in tl.range(0, S, BS, num_stages=1):
        cols = s0 + rs
        xg = _load_rows(gen_ptr, sgb, sgr, sgs, b, rg, CG, cols, S)
        xp = _load_rows(pos_ptr, spb, spr, sps, b, rp, CP, cols, S)
        acc_gg += _dot(xg, tl.trans(xg), IEEE, UPCAST, F32DOT)
        acc_gp += _dot(xg, tl.trans(xp), IEEE, UPCAST, F32DOT)
        xg32 = xg.to(tl.float32)
        xp32 = xp.to(tl.float32)
        sq_g += tl.sum(xg32 * xg32, axis=1)
        sq_p += tl.sum(xp32 * xp32, axis=1)
        if HAS_NEG:
            xn = _load_rows(neg_ptr, snb, snr, sns, b, rn, CN, cols, S)
            acc_gn += _dot(xg, tl.trans(xn), IEEE, UPCAST, F32DOT)
            xn32 = xn.to(tl.float32)
            sq_n += tl.sum(xn32 * xn32, axis=1)
    d_gg = tl.sqrt(tl.maximum(sq_g[:, None] + sq_g[None, :] - 2.0 * acc_gg, 1e-8))
    d_gn = tl.sqrt(tl.maximum(sq_g[:, None] + sq_n[None, :] - 2.0 * acc_gn, 1e-8))
    d_gp = tl.sqrt(tl.maximum(sq_g[:, None] + sq_p[None, :] - 2.0 * acc_gp, 1e-8))

    # ---- target weights (after normalisation, as in the authors' code); padding weighs 0 -----------------------
    if HAS_WG:
        w_g = tl.load(wg_ptr + b * CG + rg, mask=valid_g, other=0.0).to(tl.float32)
    else:
        w_g = tl.where(valid_g, 1.0, 0.0)
    if HAS_WN:
        w_n = tl.load(wn_ptr + b * CN + rn, mask=valid_n, other=0.0).to(tl.float32)
    else:
        w_n = tl.where(valid_n, 1.0, 0.0)
    if HAS_WP:
        w_p = tl.load(wp_ptr + b * CP + rp, mask=valid_p, other=0.0).to(tl.float32)
    else:
        w_p = tl.where(valid_p, 1.0, 0.0)

    m_gg = valid_g[:, None] & valid_g[None, :]
    m_gn = valid_g[:, None] & valid_n[None, :]
    m_gp = valid_g[:, None] & valid_p[None, :]

    if PASS == 1:
        total = tl.sum(tl.sum(tl.where(m_gg, d_gg * w_g[None, :], 0.0), axis=1), axis=0)
        total += tl.sum(tl.sum(tl.where(m_gp, d_gp * w_p[None, :], 0.0), axis=1), axis=0)
        weights = tl.sum(w_g, axis=0) + tl.sum(w_p, axis=0)
        if HAS_NEG:
            total += tl.sum(tl.sum(tl.where(m_gn, d_gn * w_n[None, :], 0.0), axis=1), axis=0)
            weights += tl.sum(w_n, axis=0)
        tl.store(out_ptr + b * 2, total)
        tl.store(out_ptr + b * 2 + 1, weights * CG)
    else:
        # normalised distances with the self-mask, in units of the scale (read from memory: no host sync); one
        # scale for all problems (params_stride 0), or one per problem (stacked keys, stride 2)
        scale = tl.load(params_ptr + b * params_stride)
        s_in = tl.load(params_ptr + b * params_stride + 1)
        inv_scale = 1.0 / tl.maximum(scale, 1e-3)
        n_gg = d_gg * inv_scale + tl.where(rg[:, None] == rg[None, :], self_mask, 0.0)
        n_gn = d_gn * inv_scale
        n_gp = d_gp * inv_scale
        coef_gg = tl.zeros((BG, BG), dtype=tl.float32)
        coef_gn = tl.zeros((BG, BN), dtype=tl.float32)
        coef_gp = tl.zeros((BG, BP), dtype=tl.float32)
        norm_width = 2 * BG + BN + BP  # u, then v of the three blocks, per problem and temperature
        # a rolled loop over temperatures keeps one temperature's temporaries live at a time (fewer registers)
        for r in tl.range(0, R, loop_unroll_factor=UNROLL_R):
            inv_tau = 1.0 / tl.load(temps_ptr + r)
            # padding gets the logit -1e30: its exp() is exactly 0, and unlike -inf it never makes a NaN
            l_gg = tl.where(m_gg, -n_gg * inv_tau, -1.0e30)
            l_gn = tl.where(m_gn, -n_gn * inv_tau, -1.0e30)
            l_gp = tl.where(m_gp, -n_gp * inv_tau, -1.0e30)
            norm = norm_ptr + (b * R + r) * norm_width
            if LOAD_NORM:
                # the softmaxes' normalisers in log form, written by pass 2 of this call at the same scale: one
                # exponential per entry and no reductions, A_ij = exp(l_ij + u_i + v_j)
                u = tl.load(norm + rg)
                a_gg = _affinity_from_log_norm(l_gg, u, tl.load(norm + BG + rg), m_gg, sqrt_floor) * w_g[None, :]
                a_gp = _affinity_from_log_norm(l_gp, u, tl.load(norm + 2 * BG + BN + rp), m_gp,
                                               sqrt_floor) * w_p[None, :]
                if HAS_NEG:
                    a_gn = _affinity_from_log_norm(l_gn, u, tl.load(norm + 2 * BG + rn), m_gn,
                                                   sqrt_floor) * w_n[None, :]
            else:
                # softmax over targets (per row) spans the three blocks; over generated rows (per column) each block
                row_max = tl.maximum(tl.max(l_gg, axis=1), tl.max(l_gp, axis=1))
                if HAS_NEG:
                    row_max = tl.maximum(row_max, tl.max(l_gn, axis=1))
                row_sum = (tl.sum(tl.exp(l_gg - row_max[:, None]), axis=1)
                           + tl.sum(tl.exp(l_gp - row_max[:, None]), axis=1))
                if HAS_NEG:
                    row_sum += tl.sum(tl.exp(l_gn - row_max[:, None]), axis=1)
                cmax_gg = tl.max(l_gg, axis=0)
                cmax_gp = tl.max(l_gp, axis=0)
                csum_gg = tl.sum(tl.exp(l_gg - cmax_gg[None, :]), axis=0)
                csum_gp = tl.sum(tl.exp(l_gp - cmax_gp[None, :]), axis=0)
                a_gg = _affinity(l_gg, row_max, row_sum, cmax_gg, csum_gg, m_gg, sqrt_floor, NORMALIZE) * w_g[None, :]
                a_gp = _affinity(l_gp, row_max, row_sum, cmax_gp, csum_gp, m_gp, sqrt_floor, NORMALIZE) * w_p[None, :]
                if HAS_NEG:
                    cmax_gn = tl.max(l_gn, axis=0)
                    csum_gn = tl.sum(tl.exp(l_gn - cmax_gn[None, :]), axis=0)
                    a_gn = _affinity(l_gn, row_max, row_sum, cmax_gn, csum_gn, m_gn, sqrt_floor,
                                     NORMALIZE) * w_n[None, :]
                if STORE_NORM:
                    tl.store(norm + rg, _log_norm(row_max, row_sum, valid_g, NORMALIZE, True))
                    tl.store(norm + BG + rg, _log_norm(cmax_gg, csum_gg, valid_g, NORMALIZE, False))
                    tl.store(norm + 2 * BG + BN + rp, _log_norm(cmax_gp, csum_gp, valid_p, NORMALIZE, False))
                    if HAS_NEG:
                        tl.store(norm + 2 * BG + rn, _log_norm(cmax_gn, csum_gn, valid_n, NORMALIZE, False))
            s_neg = tl.sum(a_gg, axis=1)
            s_pos = tl.sum(a_gp, axis=1)
            if HAS_NEG:
                s_neg += tl.sum(a_gn, axis=1)
            # W- = A- rowsum(A+), W+ = A+ rowsum(A-); pass 3 folds 1/lambda_R into one set of coefficients
            if PASS == 2:
                c_gg = -repulsion * a_gg * s_pos[:, None]
                c_gp = attraction * a_gp * s_neg[:, None]
                rsum = tl.sum(c_gg, axis=1) + tl.sum(c_gp, axis=1)
                if HAS_NEG:
                    c_gn = -repulsion * a_gn * s_pos[:, None]
                    rsum += tl.sum(c_gn, axis=1)
                # sum over (i, s) of F_R^2, F_R = (coef @ Y - rowsum(coef) x) / s_in
                f_sq = tl.zeros((BG,), dtype=tl.float32)
                for s0 in range(0, S, BS):
                    cols = s0 + rs
                    xg = _load_rows(gen_ptr, sgb, sgr, sgs, b, rg, CG, cols, S)
                    xp = _load_rows(pos_ptr, spb, spr, sps, b, rp, CP, cols, S)
                    f = (_force_dot(c_gg, xg, IEEE, UPCAST, SPLIT2, F32DOT)
                         + _force_dot(c_gp, xp, IEEE, UPCAST, SPLIT2, F32DOT))
                    if HAS_NEG:
                        xn = _load_rows(neg_ptr, snb, snr, sns, b, rn, CN, cols, S)
                        f += _force_dot(c_gn, xn, IEEE, UPCAST, SPLIT2, F32DOT)
                    f -= rsum[:, None] * xg.to(tl.float32)
                    f_sq += tl.sum(f * f, axis=1)
                tl.store(out_ptr + b * (R + 1) + r, tl.sum(f_sq, axis=0) / (s_in * s_in))  # [B, R + 1]: count last
            else:
                inv_lambda = tl.load(inv_lambda_ptr + b * lambda_stride + r)  # one per call, or per problem
                coef_gg += (-repulsion * inv_lambda) * a_gg * s_pos[:, None]
                coef_gp += (attraction * inv_lambda) * a_gp * s_neg[:, None]
                if HAS_NEG:
                    coef_gn += (-repulsion * inv_lambda) * a_gn * s_pos[:, None]
        if PASS == 3:
            rsum = tl.sum(coef_gg, axis=1) + tl.sum(coef_gp, axis=1)
            if HAS_NEG:
                rsum += tl.sum(coef_gn, axis=1)
            # F = sum_R F_R / lambda_R; the residual gen/s_in - goal is exactly -F
            loss = tl.zeros((BG,), dtype=tl.float32)
            grad_scale = -2.0 / (s_in * CG * S) * grad_factor  # grad_factor: 1, or 1 / B for a mean (drift_loss)
            for s0 in range(0, S, BS):
                cols = s0 + rs
                xg = _load_rows(gen_ptr, sgb, sgr, sgs, b, rg, CG, cols, S)
                xp = _load_rows(pos_ptr, spb, spr, sps, b, rp, CP, cols, S)
                f = (_force_dot(coef_gg, xg, IEEE, UPCAST, True, F32DOT)
                     + _force_dot(coef_gp, xp, IEEE, UPCAST, True, F32DOT))
                if HAS_NEG:
                    xn = _load_rows(neg_ptr, snb, snr, sns, b, rn, CN, cols, S)
                    f += _force_dot(coef_gn, xn, IEEE, UPCAST, True, F32DOT)
                f = (f - rsum[:, None] * xg.to(tl.float32)) / s_in
                loss += tl.sum(f * f, axis=1)
                if WRITE_GRAD:
                    mask = valid_g[:, None] & (cols[None, :] < S)
                    offs = b * CG * S + rg[:, None] * S + cols[None, :]
                    tl.store(grad_ptr + offs, (grad_scale * f).to(grad_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptr + b, tl.sum(loss, axis=0) / (CG * S))


@functools.cache
def _temperatures(temperatures: tuple[float, ...], device: torch.device) -> Tensor:
    """The temperatures as a float32 tensor on the device, made once: building it from host numbers at every call
    is a copy that waits for the GPU to finish its queue (one host sync per key and pass, ~1,000 per step)."""
    return torch.tensor(temperatures, dtype=torch.float32, device=device)


@functools.cache
def _dummy(device: torch.device) -> Tensor:
    """A float32 [1] tensor for the kernel's unused pointer arguments (never read or written), made once per device."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _detached(t: Tensor) -> Tensor:
    """t without its graph: the kernels only read the data (no detach op for a tensor that has no graph)."""
    return t.detach() if t.requires_grad else t


def _next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def supports(gen: Tensor, pos: Tensor, neg: Tensor | None) -> bool:
    """Whether the fused kernel handles these shapes (otherwise `drift_loss` uses the reference path)."""
    c_n = 0 if neg is None else neg.shape[1]
    return (gen.shape[1] <= MAX_BLOCK_ROWS and pos.shape[1] <= MAX_BLOCK_ROWS and c_n <= MAX_BLOCK_NEG
            and gen.dtype in (torch.float32, torch.bfloat16, torch.float16) and gen.shape[2] >= 1)


class _FusedDriftLoss(torch.autograd.Function):
    """The loss, [B] or reduced to a scalar, with its gradient computed during the forward pass (pass 3 writes it
    next to the loss: for a reduced loss already times the reduction's factor)."""

    @staticmethod
    def forward(ctx, gen: Tensor, loss: Tensor, grad: Tensor | None) -> Tensor:
        ctx.save_for_backward(grad)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.consumed:
            raise RuntimeError("fused drift_loss: backward can run only once (the gradient buffer is reused)")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        # in place: the buffer is ours, and a second [B, C_g, S] tensor would double the peak memory
        if grad_loss.dim() == 0:  # a reduced loss
            return scale_all_(grad, grad_loss), None, None
        return scale_problems_(grad, grad_loss), None, None


def scale_problems_(grad: Tensor, scale: Tensor) -> Tensor:
    """grad[b] *= scale[b] in place ([B, ...] contiguous, [B]), in fp32 with one rounding to grad's dtype. On CUDA one
    streaming pass (`_scale_problems`): PyTorch's broadcast multiply takes its generic strided kernel here, 3.1 ms
    against ~1.4 ms of memory traffic for the 32x32 key's bf16 gradient on an H100 (docs/benchmarks.md). Problems
    whose scale is exactly 1 (the gradient of `losses.sum()`) are neither read nor written."""
    scale = scale.detach().float().contiguous()
    if not grad.is_cuda or _INTERPRET:
        return grad.copy_((grad.float() * scale.view(-1, *(1,) * (grad.dim() - 1))).to(grad.dtype))
    per_problem = grad[0].numel()
    _scale_problems[(grad.shape[0], triton.cdiv(per_problem, _SCALE_BLOCK))](grad, scale, per_problem,
                                                                             BLOCK=_SCALE_BLOCK)
    return grad


def scale_all_(grad: Tensor, scale: Tensor) -> Tensor:
    """grad *= scale in place (contiguous; `scale` one element), in fp32 with one rounding to grad's dtype. On CUDA
    the kernel (`_scale_all`) reads the scale itself and leaves the gradient untouched where it is exactly 1, as for
    `loss.backward()` on a reduced loss: no host sync, and no read or write of the [B, C_g, S] gradient."""
    scale = scale.detach().float().reshape(1)
    if not grad.is_cuda or _INTERPRET:
        return grad.copy_((grad.float() * scale).to(grad.dtype))
    total = grad.numel()
    programs = min(triton.cdiv(total, _SCALE_BLOCK), _SCALE_PROGRAMS_PER_SM * _multiprocessors(grad.get_device()))
    _scale_all[(programs,)](grad, scale, total, BLOCK=_SCALE_BLOCK)
    return grad


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_SCALE_BLOCK = 4096


@triton.jit
def _scale_problems(grad_ptr, scale_ptr, per_problem, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    s = tl.load(scale_ptr + b)
    if s != 1.0:  # exactly 1 (the gradient of losses.sum()): this problem's gradient is already the answer
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < per_problem
        ptr = grad_ptr + b.to(tl.int64) * per_problem + offs
        x = tl.load(ptr, mask=mask)
        tl.store(ptr, (x.to(tl.float32) * s).to(x.dtype), mask=mask)


_SCALE_PROGRAMS_PER_SM = 8  # _scale_all's programs loop over the tensor: a few per SM keep its memory busy


@triton.jit
def _scale_all(grad_ptr, scale_ptr, total, BLOCK: tl.constexpr):
    s = tl.load(scale_ptr)
    if s != 1.0:  # exactly 1 (loss.backward() on a reduced loss): the gradient in place is already the answer
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, total, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < total
            x = tl.load(grad_ptr + offs, mask=mask)
            tl.store(grad_ptr + offs, (x.to(tl.float32) * s).to(x.dtype), mask=mask)


class _Kernel:
    """The kernel's launch settings for one set of problems, and its three passes."""

    def __init__(self, gen: Tensor, pos: Tensor, neg: Tensor | None, *, temperatures, gen_weight, pos_weight,
                 neg_weight, normalize, affinity_floor, self_mask, attraction, repulsion, block_s: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None):
        b, c_g, s = gen.shape
        c_p = pos.shape[1]
        c_n = 0 if neg is None else neg.shape[1]
        has_neg = c_n > 0
        device = gen.device
        self.shape, self.num_temperatures, self.device, self.c_n = (b, c_g, s), len(temperatures), device, c_n
        self.normalize_code = NORMALIZE_CODE[normalize]
        self.f32 = dict(dtype=torch.float32, device=device)
        weights = [None if w is None else _detached(w).float().contiguous()
                   for w in (gen_weight, neg_weight, pos_weight)]
        if not has_neg:
            weights[1] = None
        self.dummy = _dummy(device)
        temps = _temperatures(tuple(temperatures), device)
        self.cuda = None  # the CUDA C++ kernel's inputs, where VARIANT["cuda"] is on and the problems fit it
        if VARIANT["cuda"] and not _INTERPRET and drift_cuda.supports(gen, pos, neg, len(temperatures)):
            # bf16 inputs as they are (the kernel reads them through pointers), and nothing of the Triton kernel's
            # set-up: this is host time before pass 1 starts
            self.cuda = dict(gen=gen, pos=pos, neg=neg if has_neg else None, weights=tuple(weights), temps=temps,
                             dummy=self.dummy,
                             options=dict(normalize=normalize, sqrt_floor=math.sqrt(affinity_floor),
                                          self_mask=self_mask, attraction=attraction, repulsion=repulsion))
            return
        # bf16 inputs run on bf16 tensor cores; anything else (fp32, fp16, mixed) is computed in full fp32
        ieee = not all(t.dtype == torch.bfloat16 for t in (gen, pos, neg) if t is not None)
        dtype = torch.float32 if ieee else torch.bfloat16
        x = _detached(gen).to(dtype)
        pos = _detached(pos).to(dtype)
        neg = _detached(neg).to(dtype) if has_neg else None
        block_g, block_n, block_p = _next_pow2(c_g), _next_pow2(max(c_n, 1)), _next_pow2(c_p)
        large = max(block_g, block_p) > 64
        # measured on an H200 at the ablation sizes (benchmarks/tune_drift_kernel.py, docs/benchmarks.md): 64-wide
        # tiles of S, one warpgroup, a rolled temperature loop: 28 ms against 41-48 ms for the other settings tried.
        # Blocks of 128 rows need less shared memory per stage (their fp32 coefficient tiles are dot operands).
        # fp32 inputs: narrower tiles (VARIANT["fp32_block_s"]), as wide ones spill (see VARIANT).
        bs = block_s or (32 if large else VARIANT["fp32_block_s"] if ieee else 64)
        warps = num_warps or (8 if large else 4)
        stages = num_stages or (1 if large else 2)
        unroll_r = int(os.environ.get("DRIFTING_UNROLL_R", "1"))
        neg_t = neg if has_neg else x
        self.common = dict(
            CG=c_g, CN=c_n, CP=c_p, S=s, sqrt_floor=math.sqrt(affinity_floor), self_mask=float(self_mask),
            attraction=float(attraction), repulsion=float(repulsion), R=len(temperatures),
            NORMALIZE=self.normalize_code, HAS_NEG=has_neg, HAS_WG=weights[0] is not None,
            HAS_WN=weights[1] is not None, HAS_WP=weights[2] is not None, BG=block_g, BN=block_n, BP=block_p, BS=bs,
            IEEE=ieee, UPCAST=_INTERPRET, F32DOT=VARIANT["fp32_dot"], num_warps=warps, num_stages=stages,
            UNROLL_R=unroll_r, SPLIT2=VARIANT["split2"],
        )
        if VARIANT["maxnreg"] and not _INTERPRET:  # a compile option of the CUDA backend (the interpreter has none)
            self.common["maxnreg"] = VARIANT["maxnreg"]
        self.pointers = (x, neg_t, pos, *(w if w is not None else self.dummy for w in weights), temps)
        self.strides = (*x.stride(), *neg_t.stride(), *pos.stride())

    def launch(self, pass_: int, out: Tensor, params: Tensor, inv_lambda: Tensor, grad: Tensor | None,
               norm: Tensor | None = None, grad_factor: float = 1.0) -> None:
        """norm: pass 2 writes each problem's softmax normalisers there, pass 3 reads them (same call, same scale);
        the CUDA kernel's pass 1 writes the targets' squared norms there first (`norm_buffer`). grad_factor: pass 3
        writes the gradient times this (1 / B for a mean over the problems, see `fused_drift_loss`)."""
        per_problem = dict(params_stride=2 if params.dim() == 2 else 0,  # [B, 2] / [B, R]: one per problem
                           lambda_stride=inv_lambda.shape[-1] if inv_lambda.dim() == 2 else 0)
        if self.cuda is not None:
            c = self.cuda
            drift_cuda.launch(pass_, c["gen"], c["pos"], c["neg"], c["weights"], c["temps"], inv_lambda, out, grad,
                              params, norm, c["dummy"], **c["options"], **per_problem, grad_factor=grad_factor)
            return
        _drift_kernel[(self.shape[0],)](*self.pointers, inv_lambda, out, grad if grad is not None else self.dummy,
                                        params, norm if norm is not None and pass_ != 1 else self.dummy, *self.strides,
                                        **per_problem, PASS=pass_,
                                        WRITE_GRAD=grad is not None, STORE_NORM=norm is not None and pass_ == 2,
                                        LOAD_NORM=norm is not None and pass_ == 3, grad_factor=grad_factor,
                                        **self.common)

    def norm_buffer(self) -> Tensor | None:
        """The buffer that a call's passes share, or None: for the Triton kernel [B, R, 2 BG + BN + BP] float32,
        the softmax normalisers (u, then v of each block); for the CUDA kernel also the targets' squared norms from
        pass 1 ([B, drift_cuda.norm_floats])."""
        if not VARIANT["share_norm"] or self.normalize_code == NORMALIZE_CODE["none"]:
            return None
        if self.cuda is not None:
            return torch.empty(self.shape[0], drift_cuda.norm_floats(self.c_n, self.num_temperatures), **self.f32)
        c = self.common
        return torch.empty(self.shape[0], c["R"], 2 * c["BG"] + c["BN"] + c["BP"], **self.f32)

    def params(self, scale: Tensor) -> Tensor:
        """[scale, s_in] as float32 on the device ([B, 2] for one scale per problem); the statistics never leave
        the GPU."""
        scale = scale.to(self.device)
        return torch.stack([scale, (scale / math.sqrt(self.shape[2])).clamp_min(MIN_SCALE)], dim=-1).float()

    def scale_sums(self, norm: Tensor | None = None) -> Tensor:
        """Pass 1, per problem: [sum_ij w_bj d_bij, C_g sum_j w_bj] (float64, [B, 2]), as `drift._scale_sums`
        (`norm`: the CUDA kernel writes the targets' squared norms there for passes 2 and 3)."""
        part = torch.empty(self.shape[0], 2, **self.f32)
        self.launch(1, part, self.dummy, self.dummy, None, norm)
        return part.double()

    def square_sums(self, scale: Tensor, norm: Tensor | None = None) -> Tensor:
        """Pass 2, per problem: [sum F_tau^2 for each tau, C_g S] (float64, [B, R + 1]) at `scale` (a scalar, or
        one per problem [B]), as `drift._square_sums`."""
        return self.square_sums_at(self.params(scale), norm)

    def square_sums_at(self, params: Tensor, norm: Tensor | None = None) -> Tensor:
        """`square_sums` at the scale's parameters (`params`), for a caller that has them already."""
        b, c_g, s = self.shape
        part = torch.empty(b, self.num_temperatures + 1, **self.f32)
        self.launch(2, part, params, self.dummy, None, norm)
        part = part.double()
        part[:, -1] = c_g * s  # the number of field entries: a fill on the device, no copy from the host
        return part


_STATS_OPTIONS = dict(temperatures=(1.0,), normalize="xy", affinity_floor=0.0, self_mask=0.0, attraction=1.0,
                      repulsion=1.0)  # pass 1 reads none of them


def fused_scale_sums(gen: Tensor, pos: Tensor, neg: Tensor | None, *, gen_weight, pos_weight, neg_weight) -> Tensor:
    """`drift.scale_sums` on CUDA (or under TRITON_INTERPRET=1), arguments checked by the caller."""
    return _Kernel(gen, pos, neg, gen_weight=gen_weight, pos_weight=pos_weight, neg_weight=neg_weight,
                   **_STATS_OPTIONS).scale_sums()


def fused_square_sums(gen: Tensor, pos: Tensor, neg: Tensor | None, *, scale: Tensor, temperatures, gen_weight,
                      pos_weight, neg_weight, normalize, affinity_floor, self_mask, attraction, repulsion) -> Tensor:
    """`drift.field_square_sums` at `scale` (the global distance scale) on CUDA, arguments checked by the caller."""
    kernel = _Kernel(gen, pos, neg, temperatures=temperatures, gen_weight=gen_weight, pos_weight=pos_weight,
                     neg_weight=neg_weight, normalize=normalize, affinity_floor=affinity_floor, self_mask=self_mask,
                     attraction=attraction, repulsion=repulsion)
    return kernel.square_sums(scale)


def fused_drift_loss(
    gen: Tensor, pos: Tensor, neg: Tensor | None, *, temperatures, gen_weight, pos_weight, neg_weight, normalize,
    affinity_floor, self_mask, attraction, repulsion, all_reduce, stats, block_s: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, reduction: str = "none",
) -> tuple[Tensor, dict[str, Tensor]]:
    """`drift_loss` on CUDA (or under TRITON_INTERPRET=1): same arguments, checked by the caller."""
    kernel = _Kernel(gen, pos, neg, temperatures=temperatures, gen_weight=gen_weight, pos_weight=pos_weight,
                     neg_weight=neg_weight, normalize=normalize, affinity_floor=affinity_floor, self_mask=self_mask,
                     attraction=attraction, repulsion=repulsion, block_s=block_s, num_warps=num_warps,
                     num_stages=num_stages)
    norm = params = None
    if stats is None:
        norm = kernel.norm_buffer()
        sums = kernel.scale_sums(norm).sum(0)
        if all_reduce is not None:
            sums = all_reduce(sums)
        scale = sums[0] / sums[1]
        params = kernel.params(scale)  # passes 2 and 3 share them
        squares = kernel.square_sums_at(params, norm).sum(0)
        if all_reduce is not None:
            squares = all_reduce(squares)
        stats = DriftStats(scale, squares[:-1] / squares[-1])
    b, c_g, s = kernel.shape
    # [R], or [B, R] with one set of statistics per problem (stacked keys: drift_loss(groups=...))
    inv_lambda = stats.drift_rms.to(kernel.device).reciprocal().float().contiguous()
    loss = torch.empty(b, **kernel.f32)
    needs_grad = torch.is_grad_enabled() and gen.requires_grad
    grad = torch.empty(b, c_g, s, dtype=gen.dtype, device=kernel.device) if needs_grad else None
    # a reduced loss's gradient is written for its reduction, so that its backward has nothing left to do where the
    # incoming gradient is 1 (loss.backward()); "none" is scaled per problem in the backward (scale_problems_)
    grad_factor = 1.0 / max(b, 1) if reduction == "mean" else 1.0
    if params is None:  # statistics given by the caller
        params = kernel.params(stats.scale)
    kernel.launch(3, loss, params, inv_lambda, grad, norm, grad_factor=grad_factor)
    if reduction != "none":
        loss = loss.mean() if reduction == "mean" else loss.sum()
    info = {"scale": stats.scale, "drift_ms": stats.drift_ms}
    if needs_grad:
        return _FusedDriftLoss.apply(gen, loss, grad), info
    return loss, info


assert MIN_SQUARED_DISTANCE == 1e-8  # the kernel hard-codes the authors' clamp of the squared distance
