"""The statistics keys of one tapped map in one Triton kernel: mean and std over the whole map, 2x2 and 4x4 windows.

`features.tap_sets` computes a tap's six statistics keys (features.py: <name>_mean, _std, _mean_2, _std_2, _mean_4,
_std_4) from one float32 copy of the map with six reductions, each its own kernel with its own read of the map, and
the same again in the backward. At the ablation size that was 2.2 s of a 9-s training step on an H200 (the ninth
sitting's profile: 7,584 reduction kernels at 2-4% of the memory bandwidth, because each reduces 4-1024 strided
values per output). Here one program loads BLOCK_C channels of one sample's map once, in bf16 or fp32, and computes
all six in registers, in float32, with the same two-pass variance as the reference (mean first, then the mean of the
squared deviations); the backward reads the map once more and writes its gradient once.

The map tile is held as [BLOCK_C, P, Q, R]: R the 4 values of a 2x2 window, Q the 4 windows of a 4x4 window, P the
4x4 windows (row-major) -- so the 2x2 statistics reduce R, the 4x4 statistics R and Q, the whole map everything.
When 4 does not divide the map, Q = 1 and P counts the 2x2 windows; when 2 does not either, R = 1 and P counts the
locations. Outputs are [N, L, C] float32 (contiguous), as the reference keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

TILE = 8192  # map values per program (BLOCK_C x H x W, padded): 32 fp32 registers per thread at 8 warps


@triton.jit
def _map_tile(x_ptr, n, c0, s_n, s_c, s_h, s_w, C,
              H: tl.constexpr, W: tl.constexpr, G2: tl.constexpr, G4: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_P, Q, R] of the map values of channels c0.. of sample n, and their mask."""
    c = c0 + tl.arange(0, BLOCK_C)[:, None, None, None]
    p = tl.arange(0, BLOCK_P)[None, :, None, None]
    q = tl.arange(0, Q)[None, None, :, None]
    r = tl.arange(0, R)[None, None, None, :]
    if G4:  # p: 4x4 window (i, j); q: its 2x2 window (a, e); r: the value (b, f) -> row 4i + 2a + b, col 4j + 2e + f
        row = 4 * (p // (W // 4)) + 2 * (q // 2) + r // 2
        col = 4 * (p % (W // 4)) + 2 * (q % 2) + r % 2
        num_p = (H // 4) * (W // 4)
    elif G2:  # p: 2x2 window (i, j); r: the value (b, f) -> row 2i + b, col 2j + f
        row = 2 * (p // (W // 2)) + r // 2
        col = 2 * (p % (W // 2)) + r % 2
        num_p = (H // 2) * (W // 2)
    else:  # p: the location
        row = p // W + 0 * (q + r)
        col = p % W
        num_p = H * W
    mask = (c < C) & (p < num_p) & (q < Q) & (r < R)
    offsets = n * s_n + c * s_c + row * s_h + col * s_w
    return offsets, mask


@triton.jit
def _moments(x, mask, H: tl.constexpr, W: tl.constexpr):
    """Whole-map, 2x2-window and 4x4-window means and deviations of the tile x (zero where masked)."""
    mean0 = tl.sum(tl.sum(tl.sum(x, axis=3), axis=2), axis=1) / (H * W)  # [BLOCK_C]
    d0 = tl.where(mask, x - mean0[:, None, None, None], 0.0)
    mean2 = tl.sum(x, axis=3) / x.shape[3]  # [BLOCK_C, BLOCK_P, Q]: per 2x2 window (R = 4)
    d2 = tl.where(mask, x - mean2[:, :, :, None], 0.0)
    mean4 = tl.sum(tl.sum(x, axis=3), axis=2) / (x.shape[2] * x.shape[3])  # [BLOCK_C, BLOCK_P]: per 4x4 window
    d4 = tl.where(mask, x - mean4[:, :, None, None], 0.0)
    return mean0, d0, mean2, d2, mean4, d4


@triton.jit
def _window_outputs(n, c, C, H: tl.constexpr, W: tl.constexpr, G4: tl.constexpr, BLOCK_P: tl.constexpr,
                    Q: tl.constexpr):
    """Offsets and masks into the [N, L, C] outputs of the 2x2 windows ([BLOCK_C, BLOCK_P, Q]: window q of tile
    position p; in the 4x4 layout at row 2i + a, col 2j + e of the window grid) and of the 4x4 windows
    ([BLOCK_C, BLOCK_P])."""
    p = tl.arange(0, BLOCK_P)[None, :]
    c2 = c[:, None]
    q = tl.arange(0, Q)[None, None, :]
    if G4:
        loc2 = (2 * (p[:, :, None] // (W // 4)) + q // 2) * (W // 2) + 2 * (p[:, :, None] % (W // 4)) + q % 2
    else:
        loc2 = p[:, :, None] + 0 * q
    out2 = (n * ((H // 2) * (W // 2)) + loc2) * C + c2[:, :, None]
    mask2 = (c2[:, :, None] < C) & (loc2 < (H // 2) * (W // 2))
    out4 = (n * ((H // 4) * (W // 4)) + p) * C + c2
    mask4 = (c2 < C) & (p < (H // 4) * (W // 4))
    return out2, mask2, out4, mask4


@triton.jit
def _tap_stats_fwd(x_ptr, m0_ptr, s0_ptr, m2_ptr, s2_ptr, m4_ptr, s4_ptr,
                   s_n, s_c, s_h, s_w, C, eps,
                   H: tl.constexpr, W: tl.constexpr, G2: tl.constexpr, G4: tl.constexpr,
                   STORE2: tl.constexpr, STORE4: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    offsets, mask = _map_tile(x_ptr, n, c0, s_n, s_c, s_h, s_w, C, H, W, G2, G4, BLOCK_C, BLOCK_P, Q, R)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean0, d0, mean2, d2, mean4, d4 = _moments(x, mask, H, W)

    c = c0 + tl.arange(0, BLOCK_C)
    out0 = n * C + c  # [N, 1, C]
    tl.store(m0_ptr + out0, mean0, mask=c < C)
    var0 = tl.sum(tl.sum(tl.sum(d0 * d0, axis=3), axis=2), axis=1) / (H * W)
    tl.store(s0_ptr + out0, tl.sqrt_rn(var0 + eps), mask=c < C)

    out2, mask2, out4, mask4 = _window_outputs(n, c, C, H, W, G4, BLOCK_P, Q)
    if STORE2:  # [N, (H/2)(W/2), C]
        tl.store(m2_ptr + out2, mean2, mask=mask2)
        tl.store(s2_ptr + out2, tl.sqrt_rn(tl.sum(d2 * d2, axis=3) / 4 + eps), mask=mask2)
    if STORE4:  # [N, (H/4)(W/4), C]
        tl.store(m4_ptr + out4, mean4, mask=mask4)
        tl.store(s4_ptr + out4, tl.sqrt_rn(tl.sum(tl.sum(d4 * d4, axis=3), axis=2) / 16 + eps), mask=mask4)


@triton.jit
def _tap_stats_bwd(x_ptr, dx_ptr, gm0_ptr, gs0_ptr, gm2_ptr, gs2_ptr, gm4_ptr, gs4_ptr,
                   s_n, s_c, s_h, s_w, d_n, d_c, d_h, d_w, C, eps,
                   H: tl.constexpr, W: tl.constexpr, G2: tl.constexpr, G4: tl.constexpr,
                   HAS_M0: tl.constexpr, HAS_S0: tl.constexpr, HAS_M2: tl.constexpr, HAS_S2: tl.constexpr,
                   HAS_M4: tl.constexpr, HAS_S4: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, Q: tl.constexpr, R: tl.constexpr):
    """d/dx of a mean over n values: g / n; of sqrt(var + eps): g (x - mean) / (n std). Summed over the keys."""
    n = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK_C
    offsets, mask = _map_tile(x_ptr, n, c0, s_n, s_c, s_h, s_w, C, H, W, G2, G4, BLOCK_C, BLOCK_P, Q, R)
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    mean0, d0, mean2, d2, mean4, d4 = _moments(x, mask, H, W)
    dx = tl.zeros_like(x)

    c = c0 + tl.arange(0, BLOCK_C)
    out0 = n * C + c
    if HAS_M0:
        dx += (tl.load(gm0_ptr + out0, mask=c < C, other=0.0) / (H * W))[:, None, None, None]
    if HAS_S0:
        std0 = tl.sqrt_rn(tl.sum(tl.sum(tl.sum(d0 * d0, axis=3), axis=2), axis=1) / (H * W) + eps)
        coef0 = tl.load(gs0_ptr + out0, mask=c < C, other=0.0) / ((H * W) * std0)
        dx += coef0[:, None, None, None] * d0

    out2, mask2, out4, mask4 = _window_outputs(n, c, C, H, W, G4, BLOCK_P, Q)
    if HAS_M2:
        dx += (tl.load(gm2_ptr + out2, mask=mask2, other=0.0) / 4)[:, :, :, None]
    if HAS_S2:
        std2 = tl.sqrt_rn(tl.sum(d2 * d2, axis=3) / 4 + eps)
        dx += (tl.load(gs2_ptr + out2, mask=mask2, other=0.0) / (4 * std2))[:, :, :, None] * d2
    if HAS_M4:
        dx += (tl.load(gm4_ptr + out4, mask=mask4, other=0.0) / 16)[:, :, None, None]
    if HAS_S4:
        std4 = tl.sqrt_rn(tl.sum(tl.sum(d4 * d4, axis=3), axis=2) / 16 + eps)
        dx += (tl.load(gs4_ptr + out4, mask=mask4, other=0.0) / (16 * std4))[:, :, None, None] * d4

    d_offsets, _ = _map_tile(dx_ptr, n, c0, d_n, d_c, d_h, d_w, C, H, W, G2, G4, BLOCK_C, BLOCK_P, Q, R)
    tl.store(dx_ptr + d_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(h: int, w: int, channels: int) -> dict:
    """The tile's constexprs for an h x w map of `channels` channels."""
    g4 = h % 4 == 0 and w % 4 == 0
    g2 = h % 2 == 0 and w % 2 == 0
    q, r = (4, 4) if g4 else (1, 4) if g2 else (1, 1)
    block_p = triton.next_power_of_2(h * w // (q * r))
    block_c = max(1, min(triton.next_power_of_2(channels), TILE // (block_p * q * r)))
    return dict(H=h, W=w, G2=g2, G4=g4, BLOCK_C=block_c, BLOCK_P=block_p, Q=q, R=r)


class _TapStatistics(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fmap: Tensor, windows: tuple[int, ...], eps: float):
        n, c, h, w = fmap.shape
        meta = _layout(h, w, c)
        store2, store4 = 2 in windows, 4 in windows
        if (store2 and not meta["G2"]) or (store4 and not meta["G4"]):
            raise ValueError(f"windows {windows}: each must divide the map size {h}x{w}")

        def new(locations: int) -> Tensor:
            return torch.empty(n, locations, c, device=fmap.device, dtype=torch.float32)

        m0, s0 = new(1), new(1)
        m2, s2 = (new(h * w // 4), new(h * w // 4)) if store2 else (m0, s0)  # unused pointers when not stored
        m4, s4 = (new(h * w // 16), new(h * w // 16)) if store4 else (m0, s0)
        grid = (n, triton.cdiv(c, meta["BLOCK_C"]))
        _tap_stats_fwd[grid](fmap, m0, s0, m2, s2, m4, s4, *fmap.stride(), c, eps,
                             STORE2=store2, STORE4=store4, num_warps=8, **meta)
        ctx.save_for_backward(fmap)
        ctx.windows, ctx.eps = windows, eps
        ctx.set_materialize_grads(False)
        return (m0, s0) + ((m2, s2) if store2 else ()) + ((m4, s4) if store4 else ())

    @staticmethod
    def backward(ctx, *grads):
        (fmap,) = ctx.saved_tensors
        n, c, h, w = fmap.shape
        meta = _layout(h, w, c)
        slots = ["m0", "s0"] + (["m2", "s2"] if 2 in ctx.windows else []) + (["m4", "s4"] if 4 in ctx.windows else [])
        given = {slot: g.contiguous() for slot, g in zip(slots, grads) if g is not None}
        if not given:
            return None, None, None
        dx = torch.empty_like(fmap)
        dummy = next(iter(given.values()))
        pointers = [given.get(slot, dummy) for slot in ("m0", "s0", "m2", "s2", "m4", "s4")]
        flags = {f"HAS_{slot.upper()}": slot in given for slot in ("m0", "s0", "m2", "s2", "m4", "s4")}
        grid = (n, triton.cdiv(c, meta["BLOCK_C"]))
        _tap_stats_bwd[grid](fmap, dx, *pointers, *fmap.stride(), *dx.stride(), c, ctx.eps,
                             num_warps=8, **flags, **meta)
        return dx, None, None


def tap_statistics(fmap: Tensor, windows: tuple[int, ...], eps: float) -> tuple[Tensor, ...]:
    """(mean, std, then per window in `windows` (2 and/or 4, in that order) its mean and std) of fmap [N, C, h, w],
    each [N, L, C] float32; differentiable (one autograd node for all of them: differentiate them together)."""
    return _TapStatistics.apply(fmap, tuple(windows), float(eps))
