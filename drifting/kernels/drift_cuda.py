"""The fused drifting loss's three passes on tensor cores in CUDA C++ (`drift_cuda.cu`), compiled at run time.

On by default (`drift_triton.VARIANT["cuda"]`; the benchmarks' `--kernel-variant cuda=false` turns it off).
`drift_triton._Kernel` hands the passes of a call to this module when `supports` says the problems fit (bf16
inputs, C_g <= 64, C_p <= 64, C_n <= 16, S a multiple of 8 and at most 256: the 32x32 key of the paper's ablation)
and runs the Triton kernel otherwise. Same outputs ([B, 2] distance sums, [B, R + 1] square sums, the loss and the
gradient), same arithmetic: bf16 tensor-core distances with fp32 accumulation, hi/lo-split force coefficients, fp32
softmaxes. Only the softmax normalisers handed from pass 2 to pass 3 are stored differently (base 2, `norm_width`
floats per problem and temperature), so both passes of a call take the same path. The same buffer also hands the
targets' squared norms from pass 1 to passes 2 and 3 (`norm_floats`), which then skip those products.

The source is compiled with NVRTC (no C++ build step, no header, no CUDA toolkit: the NVRTC library PyTorch ships
with), once per template instance and device, for the device's own architecture: on an H100/H200 ("sm_90a") the
products are Hopper's asynchronous warpgroup instructions (wgmma), elsewhere mma.sync. A machine where compiling
fails keeps the Triton kernel.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("drift_cuda.cu")
THREADS = 128  # 4 warps per problem, 16 generated rows each
ROWS, POSITIVES, NEGATIVES = 64, 64, 16  # padded block sizes of the kernel (kBG, kBP, BN)
CHUNK, MAX_S = 64, 256  # columns of S per shared-memory chunk; at most 4 chunks stay in shared memory
NORMALIZE_CODE = {"xy": 0, "y": 1, "none": 2}
_INT_MAX = 2**31 - 1  # the launcher passes integers as C ints


def _targets(c_n: int) -> int:
    return ROWS + (NEGATIVES if c_n else 0) + POSITIVES


def norm_width(c_n: int) -> int:
    """Floats per problem and temperature of pass 2's normalisers: u of the rows, then v + log2 w of the targets."""
    return ROWS + _targets(c_n)


def norm_floats(c_n: int, num_temperatures: int) -> int:
    """Floats per problem of the buffer that a call's passes share: pass 2's normalisers (`norm_width` per
    temperature), then the squared norms of the targets other than the generated rows, written by pass 1 and read by
    passes 2 and 3 in place of their own products."""
    return num_temperatures * norm_width(c_n) + _targets(c_n) - ROWS


def shared_bytes(c_n: int, s: int, num_temperatures: int, load_norm: bool) -> int:
    """Dynamic shared memory of one block (the kernel's layout): the targets' chunks of S, then floats: the
    normalisers of every temperature (pass 3 reading pass 2's), 5 T of weights, squared norms, column minima, v and
    the weights' logarithms, 32 (T + 4) column partials, 6 per temperature and 4 more."""
    t = _targets(c_n)
    floats = (num_temperatures * norm_width(c_n) if load_norm else 0) + 5 * t + 32 * (t + 4) + 6 * num_temperatures + 4
    return -(-s // CHUNK) * t * 128 + 4 * floats


def pass1_shared_bytes(c_n: int, s: int) -> int:
    """Pass 1's dynamic shared memory: the targets' chunks and 4 T floats (weights, squared norms, 4 for a sum), so
    that three blocks fit an SM."""
    t = _targets(c_n)
    return -(-s // CHUNK) * t * 128 + 4 * 4 * t


def _rows_fit(t: Tensor) -> bool:
    """Rows that cp.async can copy in 16-byte pieces: unit stride along S, 8-element aligned rows and problems."""
    return (t.stride(2) == 1 and t.stride(1) % 8 == 0 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0
            and max(t.stride(0), t.stride(1)) <= _INT_MAX)


def shapes_fit(gen: Tensor, pos: Tensor, neg: Tensor | None, num_temperatures: int,
               shared_limit: int = 227 * 1024) -> bool:
    """Whether the problems have the kernel's dtype, sizes and memory layout (on any device), and a block's shared
    memory fits `shared_limit` bytes (an H100's or H200's by default)."""
    tensors = [gen, pos] + ([neg] if neg is not None and neg.shape[1] else [])
    b, c_g, s = gen.shape
    c_n = 0 if neg is None else neg.shape[1]
    return (all(t.dtype == torch.bfloat16 for t in tensors)
            and 1 <= c_g <= ROWS and 1 <= pos.shape[1] <= POSITIVES and c_n <= NEGATIVES
            and 8 <= s <= MAX_S and s % 8 == 0 and b * c_g * s <= _INT_MAX and all(_rows_fit(t) for t in tensors)
            and shared_bytes(c_n, s, num_temperatures, True) <= shared_limit)


def supports(gen: Tensor, pos: Tensor, neg: Tensor | None, num_temperatures: int) -> bool:
    """Whether the CUDA kernel takes these problems (else the Triton kernel does): they fit, on a GPU of compute
    capability 8.0 or later (mma.sync, ldmatrix, cp.async) where the kernel compiles."""
    if not gen.is_cuda:
        return False
    device = gen.device.index or 0
    capability, limit = _device(device)
    return capability >= (8, 0) and shapes_fit(gen, pos, neg, num_temperatures, limit) and available(device)


@functools.cache
def _device(index: int) -> tuple[tuple[int, int], int]:
    """The device's compute capability and shared memory per block, asked once (each query costs host time at
    every call otherwise)."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.shared_memory_per_block_optin


@functools.cache
def available(device_index: int) -> bool:
    """Whether NVRTC compiles and loads the kernel on this device (tried once, with one instance of pass 2)."""
    try:
        _compiled(2, 0, NEGATIVES, MAX_S // CHUNK, True, False, False, device_index)
        return True
    except Exception as err:  # no NVRTC, no CUDA headers where torch looks for them, an old driver
        warnings.warn(f"drifting: the CUDA drift kernel does not compile here ({err}); using the Triton kernel",
                      stacklevel=2)
        return False


@functools.cache
def _compiled(pass_: int, normalize: int, bn: int, chunks: int, store_norm: bool, load_norm: bool,
              write_grad: bool, device_index: int):
    flags = ", ".join("true" if f else "false" for f in (store_norm, load_norm, write_grad))
    name = f"drift::drift_kernel<{pass_}, {normalize}, {bn}, {chunks}, {flags}>"
    with torch.cuda.device(device_index):
        kernel = _compile(name)
        _allow_shared_memory(kernel, torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin)
    return kernel


def _compile(name: str):
    """The kernel `name` (a template instance) for the current device, through NVRTC: machine code for its
    architecture, "sm_90a" on an H100/H200 (the wgmma instructions exist only there), loaded with the driver. The
    source includes no header, so no CUDA toolkit is needed, only the NVRTC library PyTorch ships with."""
    from torch.cuda._utils import _cuda_load_module

    cubin, lowered = nvrtc_cubin(SOURCE.read_text(), name, nvrtc_arch(torch.cuda.get_device_capability()))
    return _cuda_load_module(cubin, [lowered])[lowered]


def nvrtc_arch(capability: tuple[int, int]) -> str:
    """NVRTC's architecture for a compute capability: sm_90a on Hopper (wgmma), else sm_XY."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def nvrtc_cubin(source: str, name: str, arch: str, library=None, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Machine code for `arch` ("sm_90") of the instance `name` of `source`, and its mangled name, from NVRTC
    (`library`: a ctypes handle of libnvrtc, by default PyTorch's; `options`: more NVRTC options, e.g. -lineinfo)."""
    if library is None:
        from torch.cuda._utils import _get_gpu_rtc_library

        library = _get_gpu_rtc_library()

    library.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"NVRTC {what}: {library.nvrtcGetErrorString(code).decode()}")

    program = ctypes.c_void_p()
    check(library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"drift_cuda.cu", 0, None, None),
          "create")
    try:
        check(library.nvrtcAddNameExpression(program, name.encode()), "name")
        flags = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", *(o.encode() for o in options)]
        if library.nvrtcCompileProgram(program, len(flags), (ctypes.c_char_p * len(flags))(*flags)) != 0:
            size = ctypes.c_size_t()
            library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            library.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC could not compile {name}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        check(library.nvrtcGetCUBINSize(program, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(library.nvrtcGetCUBIN(program, cubin), "cubin")
        lowered = ctypes.c_char_p()
        check(library.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)), "lowered name")
        return cubin.raw, lowered.value.decode()  # copies, before the program is destroyed
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))


def _allow_shared_memory(kernel, size: int) -> None:
    """Raise the kernel's dynamic shared-memory limit above the default 48 KB (cuFuncSetAttribute; PyTorch's kernel
    object also checks each launch against the limit it was given)."""
    if hasattr(kernel, "set_shared_memory_config"):
        kernel.set_shared_memory_config(size)
        return
    from torch.cuda._utils import _check_cuda, _get_gpu_runtime_library

    max_dynamic_shared_size_bytes = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    _check_cuda(_get_gpu_runtime_library().cuFuncSetAttribute(kernel.func, max_dynamic_shared_size_bytes, size))


def launch(pass_: int, gen: Tensor, pos: Tensor, neg: Tensor | None, weights: tuple, temps: Tensor,
           inv_lambda: Tensor, out: Tensor, grad: Tensor | None, params: Tensor, norm: Tensor | None,
           dummy: Tensor, *, normalize: str, sqrt_floor: float, self_mask: float, attraction: float,
           repulsion: float, params_stride: int, lambda_stride: int, grad_factor: float = 1.0) -> None:
    """Pass 1, 2 or 3 over all problems, one block of 128 threads each; arguments as `drift_triton._Kernel.launch`.
    weights: (gen, neg, pos) float32 [B, C] or None. norm: [B, norm_floats] float32 shared by the passes of one
    call, in order: pass 1 writes the targets' squared norms there, pass 2 reads them and writes its normalisers,
    pass 3 reads both (or None for each pass: it computes them itself). grad_factor: pass 3 writes the gradient times
    this (the factor of a reduced loss: 1 / B for a mean). The kernel reads the tensors through their pointers, so
    they need no detaching (gen may require grad)."""
    b, c_g, s = gen.shape
    c_n = 0 if neg is None else neg.shape[1]
    chunks = -(-s // CHUNK)
    store, load = norm is not None and pass_ in (1, 2), norm is not None and pass_ == 3
    device = gen.get_device()
    kernel = _compiled(pass_, NORMALIZE_CODE[normalize] if pass_ != 1 else 0, NEGATIVES if c_n else 0, chunks, store,
                       load, grad is not None, device)
    neg_t = neg if c_n else gen
    unused = dummy.data_ptr()
    wg, wn, wp = (unused if w is None else w.data_ptr() for w in weights)
    has_wg, has_wn, has_wp = (int(w is not None) for w in weights)
    size = pass1_shared_bytes(c_n, s) if pass_ == 1 else shared_bytes(c_n, s, temps.numel(), load)
    buffer = _LAUNCH_BUFFER
    # in the order of drift_kernel's parameters (PARAMETERS)
    PARAMETERS.pack_into(
        buffer.params, 0, gen.data_ptr(), neg_t.data_ptr(), pos.data_ptr(), *gen.stride()[:2], *neg_t.stride()[:2],
        *pos.stride()[:2], wg, wn, wp, has_wg, has_wn, has_wp, temps.data_ptr(), inv_lambda.data_ptr(),
        out.data_ptr(), unused if grad is None else grad.data_ptr(), params.data_ptr(),
        unused if norm is None else norm.data_ptr(), c_g, c_n, pos.shape[1], s, temps.numel(), params_stride,
        lambda_stride, float(sqrt_floor), float(self_mask), float(attraction), float(repulsion), float(grad_factor))
    _launch_kernel(kernel.func, b, size, torch._C._cuda_getCurrentRawStream(device), buffer)


# drift_kernel's parameters as C lays them out in its parameter space, in the order of its signature: P a pointer,
# i an int, d a double, each at its natural alignment (struct's native mode); a test reads the signature from
# drift_cuda.cu and checks this
KERNEL_SIGNATURE = "PPP" "iiiiii" "PPP" "iii" "PPPPPP" "iiiiiii" "ddddd"
PARAMETERS = struct.Struct("@" + KERNEL_SIGNATURE)


@functools.cache
def _driver():
    """libcuda's cuLaunchKernel and cuGetErrorString, loaded once (the library PyTorch's NVRTC modules load)."""
    from torch.cuda._utils import _get_gpu_runtime_library

    lib = _get_gpu_runtime_library()
    launch = lib.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    launch.restype = ctypes.c_int
    return launch, lib.cuGetErrorString


class _LaunchBuffer(threading.local):
    """One thread's parameter buffer for cuLaunchKernel (CU_LAUNCH_PARAM_BUFFER_POINTER): the driver copies the
    parameters during the call, so the buffer is reused by the thread's next launch instead of built anew."""

    def __init__(self):
        self.params = ctypes.create_string_buffer(PARAMETERS.size)
        self.size = ctypes.c_size_t(PARAMETERS.size)
        # pointer, size, end (CU_LAUNCH_PARAM_BUFFER_POINTER = 1, CU_LAUNCH_PARAM_BUFFER_SIZE = 2, CU_LAUNCH_PARAM_END)
        self.extra = (ctypes.c_void_p * 5)(1, ctypes.addressof(self.params), 2, ctypes.addressof(self.size), 0)


_LAUNCH_BUFFER = _LaunchBuffer()  # one object, its buffers per thread


def _launch_kernel(func: ctypes.c_void_p, blocks: int, shared: int, stream: int, buffer: _LaunchBuffer) -> None:
    """cuLaunchKernel with the parameters packed in `buffer`, one block of THREADS threads per problem. PyTorch's
    kernel object converts each of the 33 arguments through ctypes and loads libcuda at every launch: ~0.2 ms of host
    time per launch on an H200's host, which the GPU waits for at a call's start."""
    launch, error_string = _driver()
    code = launch(func, blocks, 1, 1, THREADS, 1, 1, shared, stream, None, buffer.extra)
    if code != 0:
        message = ctypes.c_char_p()
        error_string(code, ctypes.byref(message))
        raise RuntimeError(f"CUDA error {code} launching the drift kernel: "
                           f"{message.value.decode() if message.value else 'unknown'}")
