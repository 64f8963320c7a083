"""Timing-only builds of the CUDA drift kernel: how much a change could gain at most, before it is written.

Each build is today's kernel (drifting/kernels/drift_cuda.cu) with one edit that makes its results WRONG on
purpose: work is removed, or is done on the wrong data, so that the time of the work that remains can be measured.
The builds go to `drift_cuda_builds.py`, which times them pass by pass next to the real kernel (and reports how
far their outputs are from it: the what-if builds' numbers are not results):

    python benchmarks/drift_cuda_whatif.py --out whatif
    python benchmarks/drift_cuda_builds.py current whatif/no_lo_pass2 whatif/fp16_pass2 whatif/no_lo --rounds 2

The builds:
- `no_lo_pass2`: pass 2's force products without the coefficients' low bf16 halves, one product per chunk instead
  of two. The most that a single-product force could gain in pass 2 (fp16 coefficients, for example).
- `fp16_pass2`: `no_lo_pass2` plus the cost that fp16 coefficients would bring with them: the targets rewritten in
  shared memory as fp16 (both operands of a product must have the same type), one sweep per problem after the
  distances. (The products still read them as bf16.)
- `no_lo`: no low halves in the force products of passes 2 and 3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "drifting" / "kernels"

_LOW_PRODUCTS = "    for (int kk = 0; kk < NK; ++kk) wgmma_rs(f, alo[kk], smem_desc(base + kk * 2048), 1);\n"
_PASS1_BRANCH = "  if constexpr (PASS == 1) {  // [sum_ij w_j d_ij"
_FP16_SWEEP = r"""  if constexpr (PASS == 2) {  // what-if (drift_cuda_whatif.py): targets rewritten as fp16
    const float kscale = 1.0f + 0.0f * inv_scale;  // a power-of-two scale (1 here; a runtime value, not folded)
    for (int idx = tid; idx < NCH * T * 8; idx += kThreads) {
      uint4 v = *reinterpret_cast<uint4*>(smem + 16 * idx);
      u32 w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        u32 h;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n"
            : "=r"(h) : "f"(bf16_high(w4[q]) * kscale), "f"(bf16_low(w4[q]) * kscale));
        w4[q] = h;
      }
      *reinterpret_cast<uint4*>(smem + 16 * idx) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
    }
    fence_proxy_async();
    __syncthreads();
  }
"""

# build -> the (text, replacement) edits of drift_cuda.cu, applied in order; each text must occur exactly once
BUILDS: dict[str, list[tuple[str, str]]] = {
    "no_lo_pass2": [(_LOW_PRODUCTS, "    if constexpr (PASS3)\n" + _LOW_PRODUCTS)],
    "fp16_pass2": [(_LOW_PRODUCTS, "    if constexpr (PASS3)\n" + _LOW_PRODUCTS),
                   (_PASS1_BRANCH, _FP16_SWEEP + _PASS1_BRANCH)],
    "no_lo": [(_LOW_PRODUCTS, "")],
}


def edited(source: str, name: str) -> str:
    """drift_cuda.cu's text with build `name`'s edits. Raises ValueError, naming the build and the text, where the
    kernel no longer has a text that an edit replaces (the kernel changed: update the edit)."""
    if name not in BUILDS:
        raise ValueError(f"build {name!r}: expected one of {', '.join(BUILDS)}")
    for text, replacement in BUILDS[name]:
        count = source.count(text)
        if count != 1:
            raise ValueError(f"build {name!r}: the kernel has {count} copies of {text.strip()[:60]!r}, expected 1")
        source = source.replace(text, replacement)
    return source


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for one build folder per what-if")
    parser.add_argument("--builds", default=",".join(BUILDS), help=f"comma-separated, of {', '.join(BUILDS)}")
    args = parser.parse_args(argv)
    names = [n for n in args.builds.split(",") if n]
    if not names:
        parser.error("--builds: expected at least one build")
    source = (KERNELS / "drift_cuda.cu").read_text()
    try:
        texts = {name: edited(source, name) for name in names}  # every edit checked before anything is written
    except ValueError as err:
        parser.error(str(err))
    folders = []
    for name, text in texts.items():
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "drift_cuda.cu").write_text(text)
        (folder / "drift_cuda.py").write_text((KERNELS / "drift_cuda.py").read_text())
        folders.append(folder)
        print(folder)
    return folders


if __name__ == "__main__":
    main()
