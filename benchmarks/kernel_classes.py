"""A profile's GPU time by kind of kernel: matrix products, convolutions, attention, compiled (inductor) kernels, ...

Used by the --profile option of benchmarks/generator_step.py, encoder_step.py and train_step.py, to say what a
network's time goes to besides its FLOPs: model FLOP utilisation counts only the products, convolutions and
attention, so the other classes' share is the first bound on it.

    from kernel_classes import device_ms_by_class, format_classes
    print(format_classes(device_ms_by_class(prof.events())))

Kernels are classified by name, the first matching rule winning: cuDNN's attention kernels also say "fprop" and
"bprop", so attention is tested before convolutions; cuDNN's convolution kernels are also "implicit_gemm"s, so
convolutions are tested before products.
"""

from __future__ import annotations

from torch.autograd import DeviceType

# (class, substrings of the lower-cased kernel name); the first class with a matching substring wins.
KERNEL_CLASSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("memset / memcpy", ("memset", "memcpy")),
    ("communication (NCCL)", ("nccl",)),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("convolutions (cuDNN)", ("fprop", "dgrad", "wgrad", "implicit_gemm", "convolve", "conv2d")),
    ("layout conversions (cuDNN)", ("nchwtonhwc", "nhwctonchw")),
    ("matrix products (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma")),
    ("matrix products (inductor's Triton templates)", ("triton_tem_",)),
    ("drifting kernels (ours)", ("drift_kernel", "_relayout", "_tap_stats", "_scale_all", "_scale_problems")),
    ("compiled elementwise and reductions (inductor)", ("triton_",)),
    ("other kernels (aten elementwise, reductions, copies)",
     ("elementwise", "reduce", "vectorized", "copy", "kernel")),
)
OTHER = "other"


def kernel_class(name: str) -> str:
    """The class of a kernel, by its name (see KERNEL_CLASSES); OTHER when no rule matches."""
    lower = name.lower()
    for cls, parts in KERNEL_CLASSES:
        if any(part in lower for part in parts):
            return cls
    return OTHER


def device_ms_by_class(events) -> dict[str, tuple[float, int]]:
    """Milliseconds and count of the device's kernels, copies and fills per class, largest first. events: the
    profiler's FunctionEvents (`prof.events()`); user annotations' GPU spans are not work and are left out."""
    totals: dict[str, list] = {}
    for e in events:
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False) or "annotation" in e.name:
            continue
        entry = totals.setdefault(kernel_class(e.name), [0.0, 0])
        entry[0] += e.time_range.elapsed_us() / 1e3
        entry[1] += 1
    return {cls: (ms, n) for cls, (ms, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])}


def format_classes(by_class: dict[str, tuple[float, int]]) -> str:
    """A table of `device_ms_by_class`: class, ms, share of the listed time, kernel count."""
    total = sum(ms for ms, _ in by_class.values())
    lines = [f"GPU time by kernel class ({total:.1f} ms of device work)"]
    lines += [f"  {cls:<50} {ms:9.1f} ms {ms / max(total, 1e-9):6.1%} {n:8d} kernels"
              for cls, (ms, n) in by_class.items()]
    return "\n".join(lines) + "\n"
