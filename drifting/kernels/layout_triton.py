"""A key's vectors laid out as drifting problems, and the gradient back, in one Triton kernel each way.

`feature_loss._problems` turns a key's vectors [N_c C, L, S] (class-major samples, L locations, S channels) into
problems [N_c L, C, S] (one per class and location, its C samples as rows). For the per-location keys the vectors
are a view of an NCHW tap, whose channels are L apart in memory, so torch's copy reads S-strided values: a gather
at a fraction of the bandwidth, made for the generated and the real samples in each statistics pass and in the
loss call, and again, transposed, for the gradient (most of the ~0.5 s of copies in the ablation step's profile;
docs/benchmarks.md, eleventh sitting). Here a program moves a [BLOCK_L, BLOCK_S] tile of one sample: it reads
along whichever axis is contiguous in the source and writes along S in the problems (Triton stages the transpose
through shared memory). Pure data movement: the result is bitwise the reference's, forward and backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_L, BLOCK_S = 64, 64


@triton.jit
def _relayout(src_ptr, dst_ptr, L, S, C, s_n, s_l, s_s,
              TO_PROBLEMS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_S: tl.constexpr):
    """Sample n's tile between vectors [N, L, S] (strides s_n, s_l, s_s) and problems [N / C * L, C, S]
    (contiguous): TO_PROBLEMS copies vectors -> problems, otherwise problems -> vectors."""
    n = tl.program_id(0).to(tl.int64)
    loc = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)[:, None]
    col = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)[None, :]
    mask = (loc < L) & (col < S)
    strided = n * s_n + loc * s_l + col * s_s
    packed = (((n // C) * L + loc) * C + n % C) * S + col  # problem (class, location), row = sample in class
    if TO_PROBLEMS:
        tl.store(dst_ptr + packed, tl.load(src_ptr + strided, mask=mask), mask=mask)
    else:
        tl.store(dst_ptr + strided, tl.load(src_ptr + packed, mask=mask), mask=mask)


def _launch(src: Tensor, dst: Tensor, strided: Tensor, per_class: int, to_problems: bool) -> None:
    """Copy src -> dst, where `strided` (src or dst) is the [N, L, S] side whose shape and strides the kernel uses."""
    n, num_loc, s = strided.shape
    if strided.numel() == 0:
        return
    grid = (n, triton.cdiv(num_loc, BLOCK_L), triton.cdiv(s, BLOCK_S))
    _relayout[grid](src, dst, num_loc, s, per_class, *strided.stride(), TO_PROBLEMS=to_problems,
                    BLOCK_L=BLOCK_L, BLOCK_S=BLOCK_S, num_warps=4)


def _to_problems(vectors: Tensor, num_classes: int) -> Tensor:
    """The layout kernel's forward alone: vectors [N_c C, L, S] -> new contiguous problems [N_c L, C, S]."""
    n, num_loc, s = vectors.shape
    per_class = n // num_classes
    problems = torch.empty(num_classes * num_loc, per_class, s, dtype=vectors.dtype, device=vectors.device)
    _launch(vectors, problems, vectors, per_class, True)
    return problems


class _ProblemLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vectors: Tensor, num_classes: int) -> Tensor:
        problems = _to_problems(vectors, num_classes)
        # The gradient takes the vectors' layout where they are a view of an NCHW map (channels L apart), so it
        # passes back through the view without a copy; otherwise it is contiguous.
        ctx.per_class, ctx.shape = vectors.shape[0] // num_classes, vectors.shape
        ctx.nchw_view = vectors.transpose(1, 2).is_contiguous()
        return problems

    @staticmethod
    def backward(ctx, grad: Tensor):
        n, num_loc, s = ctx.shape
        grad = grad.contiguous()
        if ctx.nchw_view:
            out = torch.empty(n, s, num_loc, dtype=grad.dtype, device=grad.device).transpose(1, 2)
        else:
            out = torch.empty(n, num_loc, s, dtype=grad.dtype, device=grad.device)
        _launch(grad, out, out, ctx.per_class, False)
        return out, None


def problem_layout(vectors: Tensor, num_classes: int) -> Tensor:
    """vectors [N_c C, L, S] (class-major samples, any strides) -> problems [N_c L, C, S] (contiguous), as
    `feature_loss._problems`; differentiable. The caller checks that num_classes divides N."""
    if not (torch.is_grad_enabled() and vectors.requires_grad):  # no graph to record: the kernel alone
        return _to_problems(vectors, int(num_classes))
    return _ProblemLayout.apply(vectors, int(num_classes))
