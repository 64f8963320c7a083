"""The CUDA C++ drift kernel (drifting/kernels/drift_cuda.cu) compiled for an H100/H200 (sm_90) with nvcc on any
machine that has it: no GPU needed. Every tile of the kernel must live in registers: an array the compiler cannot
index statically goes to local memory (a 288-byte stack frame per thread when a coefficient was selected by a runtime
index), and more than a few dozen spilled bytes mean the register budget (255, two blocks per SM) is exceeded."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from drifting.kernels import drift_cuda

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc")

ARGS = ("const u16*, const u16*, const u16*, int, int, int, int, int, int, const float*, const float*, const float*, "
        "int, int, int, const float*, const float*, float*, u16*, const float*, float*, int, int, int, int, int, int, "
        "int, double, double, double, double, double")
INSTANCES = {  # the ablation's 32x32 key: pass 1 alone and writing the targets' norms, pass 2 writing the
    # normalisers, pass 3 reading them, pass 3 alone
    "pass1": "1, 0, 16, 4, false, false, false",
    "pass1_norms": "1, 0, 16, 4, true, false, false",
    "pass2": "2, 0, 16, 4, true, false, false",
    "pass3": "3, 0, 16, 4, false, true, true",
    "pass3_alone": "3, 0, 16, 4, false, false, true",
    "pass2_no_negatives": "2, 0, 0, 4, true, false, false",
}


@pytest.fixture(scope="module", params=["sm_90a", "sm_90"])
def resources(request, tmp_path_factory):
    """Registers, stack and spills of each instance: sm_90a (an H100/H200: wgmma) and sm_90 (the mma.sync code that
    other GPUs run)."""
    tmp = tmp_path_factory.mktemp("cuda")
    source = tmp / "instances.cu"
    source.write_text(f'#include "{drift_cuda.SOURCE}"\n' + "".join(
        f"template __global__ void drift::drift_kernel<{args}>({ARGS});\n" for args in INSTANCES.values()))
    run = subprocess.run([NVCC, f"-arch={request.param}", "-std=c++17", "-Xptxas", "-v", "-c", str(source), "-o",
                          str(tmp / "instances.o")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = {}
    for match in re.finditer(r"drift_kernelILi(\d)ELi\d+ELi(\d+)ELi\d+ELb(\d)ELb(\d)ELb(\d).*?\n\s+(\d+) bytes stack "
                             r"frame, (\d+) bytes spill stores.*?Used (\d+) registers", run.stderr, re.S):
        pass_, bn, store, load, grad, stack, spill, registers = match.groups()
        found[(pass_, bn, store, load, grad)] = (int(stack), int(spill), int(registers))
    return request.param, found, run.stderr


@needs_nvcc
def test_every_instance_compiles_and_keeps_its_tiles_in_registers(resources):
    arch, found, log = resources
    assert len(found) == len(INSTANCES), found
    # ptxas says when it must serialise the asynchronous products (C7510) or add a fence of its own (C7519)
    assert "C751" not in log, log[-3000:]
    # With mma.sync, pass 2 spills a few loop-invariant values (addresses) to keep the force's fragments, the
    # distances and the next temperature's softmax sums in registers at once: ~100 bytes, read from L1 a few dozen
    # times per temperature. A tile in local memory would take 288 bytes or more. wgmma needs no B fragments.
    limit = 16 if arch == "sm_90a" else 128
    for key, (stack, spill, registers) in found.items():
        assert registers <= (168 if key[0] == "1" else 255), (key, registers)  # pass 1: three blocks per SM
        assert stack <= limit and spill <= limit, (arch, key, stack, spill)


def test_architecture_names():
    """NVRTC compiles for the device's own architecture; Hopper's wgmma needs the "a" (arch-specific) target."""
    assert drift_cuda.nvrtc_arch((9, 0)) == "sm_90a"
    assert drift_cuda.nvrtc_arch((8, 0)) == "sm_80" and drift_cuda.nvrtc_arch((8, 9)) == "sm_89"


def test_shared_memory_fits_two_blocks_on_an_sm():
    """Two blocks of 4 warps per SM (228 KB of shared memory on an H100/H200, 1 KB reserved per block) at the
    ablation's 32x32 key (3 temperatures), pass 3 reading pass 2's normalisers."""
    size = drift_cuda.shared_bytes(16, 256, 3, True)
    assert size == 4 * 144 * 128 + 4 * (3 * 208 + 5 * 144 + 32 * 148 + 6 * 3 + 4)
    assert 2 * (size + 1024) <= 228 * 1024
    assert drift_cuda.shared_bytes(16, 256, 3, False) == size - 4 * 3 * 208
    assert 3 * (drift_cuda.pass1_shared_bytes(16, 256) + 1024) <= 228 * 1024  # pass 1: three blocks per SM


def test_the_kernel_takes_only_the_problems_it_was_written_for():
    """bf16, at most 64 generated, 64 positive and 16 negative rows, S a multiple of 8 up to 256, rows that 16-byte
    copies can read; anything else stays on the Triton kernel. On the CPU `supports` is always False."""
    import torch

    def problems(b=4, c_g=64, c_p=64, c_n=16, s=256, dtype=torch.bfloat16):
        return (torch.zeros(b, c_g, s, dtype=dtype), torch.zeros(b, c_p, s, dtype=dtype),
                torch.zeros(b, c_n, s, dtype=dtype) if c_n else None, 3)

    assert drift_cuda.shapes_fit(*problems()) and drift_cuda.shapes_fit(*problems(c_g=5, c_p=3, c_n=0, s=8))
    assert not drift_cuda.supports(*problems())  # CPU tensors
    for bad in (dict(dtype=torch.float32), dict(c_g=65), dict(c_p=128), dict(c_n=17), dict(s=264), dict(s=100),
                dict(s=4)):
        assert not drift_cuda.shapes_fit(*problems(**bad)), bad
    gen, pos, neg, r = problems()
    assert not drift_cuda.shapes_fit(gen.transpose(1, 2).contiguous().transpose(1, 2), pos, neg, r)  # S not unit-stride
    assert not drift_cuda.shapes_fit(gen[:, :, 1:249], pos[:, :, :248], neg[:, :, :248], r)  # rows not 16-byte aligned
    # temperatures: pass 3 keeps every temperature's normalisers in shared memory, which must fit the device's limit
    assert drift_cuda.shapes_fit(gen, pos, neg, 150) and not drift_cuda.shapes_fit(gen, pos, neg, 180)
    assert not drift_cuda.shapes_fit(gen, pos, neg, 3, shared_limit=90 * 1024)


def _nvrtc():
    """libnvrtc where ctypes finds it (a CUDA toolkit, or NVRTC's pip package on the library path), else None."""
    import ctypes
    import ctypes.util

    for name in ("libnvrtc.so.13", "libnvrtc.so.12", ctypes.util.find_library("nvrtc")):
        try:
            return ctypes.CDLL(name) if name else None
        except OSError:
            continue
    return None


NVRTC = _nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="needs NVRTC")
def test_nvrtc_compiles_the_kernel_for_hopper_and_older_gpus():
    """The kernel's compile path: NVRTC alone (no CUDA toolkit, no header) gives the machine code and the mangled
    name of an instance for Hopper (wgmma) and for an older GPU (mma.sync), and a compile error comes back with
    NVRTC's log."""
    for target in ("sm_90a", "sm_80"):
        cubin, name = drift_cuda.nvrtc_cubin(drift_cuda.SOURCE.read_text(),
                                             "drift::drift_kernel<2, 0, 16, 4, true, false, false>", target, NVRTC)
        assert cubin[:4] == b"\x7fELF" and name.startswith("_ZN5drift12drift_kernelILi2E")
    with pytest.raises(RuntimeError, match="could not compile"):
        drift_cuda.nvrtc_cubin("not C++", "drift::nothing<1>", "sm_90", NVRTC)


def test_kernel_parameters_follow_the_kernels_c_signature():
    """The launcher's parameter layout names drift_kernel's parameters in the order of drift_cuda.cu: a pointer for
    each `T*`, a C int for each `int`, a double for each `double`."""
    source = drift_cuda.SOURCE.read_text()
    signature = source[source.index("drift_kernel(") + len("drift_kernel("):]
    signature = signature[:signature.index(")")]
    kinds = "".join("P" if "*" in p else {"int": "i", "double": "d"}[p.split()[0]]
                    for p in (part.strip() for part in signature.split(",")))
    assert len(kinds) == 33 and kinds == drift_cuda.KERNEL_SIGNATURE


def test_kernel_parameters_are_packed_as_a_c_struct():
    """The launcher hands cuLaunchKernel its parameters as one buffer: pointers and doubles at 8-byte offsets, C ints
    at 4, padding where a C compiler puts it, as the kernel reads its parameter space (offsets worked out by hand from
    drift_kernel's signature: 3 pointers, 6 ints, 3 pointers, 3 ints, 4 bytes of padding, 6 pointers, 7 ints, 4 bytes
    of padding, 5 doubles)."""
    import struct

    values = [1001, 1002, 1003, 1, 2, 3, 4, 5, 6, 1004, 1005, 1006, 7, 8, 9, 1007, 1008, 1009, 1010, 1011, 1012,
              10, 11, 12, 13, 14, 15, 16, 0.5, 1.5, 2.5, 3.5, 4.5]
    packed = drift_cuda.PARAMETERS.pack(*values)
    assert len(packed) == 208
    assert struct.unpack_from("=3Q6i3Q3i", packed, 0) == tuple(values[:15])
    assert struct.unpack_from("=6Q7i", packed, 88) == tuple(values[15:28])
    assert struct.unpack_from("=5d", packed, 168) == tuple(values[28:])
    with pytest.raises(struct.error):  # a stride beyond a C int cannot be passed
        drift_cuda.PARAMETERS.pack(*values[:3], 2**31, *values[4:])
