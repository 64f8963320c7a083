"""Builds of the CUDA drift kernel against each other on the 32x32 key, pass by pass (CUDA only).

A BUILD is a directory that holds `drift_cuda.py` and `drift_cuda.cu`, a git revision written `git:REV` (the two
files of `drifting/kernels/` at REV), or `current` (the working tree's). On the same problems (the 32x32 key of
the paper's ablation, 65,536 problems by default) each build runs:
- passes 1, 2 and 3 alone, each the median ms of `--repeat` launches;
- a comparison of its outputs with the first build's: the largest difference over the largest value, for pass 2's
  square sums, the loss, the gradient and the normalisers. Pass 3 uses the first build's lambdas, so that like is
  compared with like. It also checks that pass 3 repeats bit for bit;
- the whole call, forward and backward, through `drift_loss(impl="fused")`, with the build in place of the
  library's kernel.

`--rounds 2` times the list twice, the second time in reverse order. The card's run-to-run drift then shows next to
the builds' differences: on an H100 it is a few percent.

    python benchmarks/drift_cuda_builds.py git:HEAD~1 current
    python benchmarks/drift_cuda_builds.py git:3f2a1c0 path/to/build current --rounds 2 --out builds.json

A build must take today's launch arguments (`drift_cuda.launch`); those since 2026-11-28 do, and those before the
gradient's factor (`grad_factor`, twenty-second sitting) are given a launch that takes it at 1. Pass 1 is timed
only for builds that run it (`pass1_shared_bytes`). Every pass gets the buffer that a call's passes share, pass 1
included (where it writes the targets' squared norms, since the twenty-first sitting); earlier builds get its old
size (`norm_floats` is added to them).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = ("drift_cuda.py", "drift_cuda.cu")
TEMPERATURES = (0.02, 0.05, 0.2)
C_G, C_P, C_N, S = 64, 64, 16, 256  # the 32x32 key's problems


def key_problems(b: int):
    """b problems of the 32x32 key on the GPU (bf16; weights on the unconditional rows) and the library's kernel
    for them: gen, pos, neg, neg_weight, drift_triton._Kernel (its `cuda` is None where the CUDA kernel does not take
    them)."""
    from drifting.kernels import drift_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    gen = torch.randn(b, C_G, S, device="cuda", generator=g).bfloat16()
    pos = (torch.randn(b, C_P, S, device="cuda", generator=g) + 0.2).bfloat16()
    neg = torch.randn(b, C_N, S, device="cuda", generator=g).bfloat16()
    neg_weight = torch.rand(b, C_N, device="cuda", generator=g) * 4
    kernel = drift_triton._Kernel(gen, pos, neg, neg_weight=neg_weight, temperatures=TEMPERATURES, gen_weight=None,
                                  pos_weight=None, normalize="xy", affinity_floor=1e-6, self_mask=100.0,
                                  attraction=1.0, repulsion=1.0)
    return gen, pos, neg, neg_weight, kernel


def build_files(spec: str) -> dict[str, str] | None:
    """The two files' text of a build ("current": None, the library's own module). Raises ValueError, naming the
    build, when they cannot be found."""
    if spec == "current":
        return None
    if spec.startswith("git:"):
        rev = spec[4:]
        texts = {}
        for name in FILES:
            try:
                shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:drifting/kernels/{name}"],
                                       capture_output=True, text=True)
            except FileNotFoundError:
                raise ValueError(f"build {spec!r}: needs git, which is not installed") from None
            if shown.returncode != 0:
                raise ValueError(f"build {spec!r}: git has no drifting/kernels/{name} at {rev!r} "
                                 f"({shown.stderr.strip()})")
            texts[name] = shown.stdout
        return texts
    folder = Path(spec)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"build {spec!r}: expected a directory with {' and '.join(FILES)}, 'git:REV' or 'current'"
                         f" (missing: {', '.join(missing)})")
    return {name: (folder / name).read_text() for name in FILES}


def load_build(spec: str, texts: dict[str, str] | None, scratch: Path, index: int) -> ModuleType:
    """The build's drift_cuda module; its SOURCE is its own .cu file (a copy under `scratch`)."""
    if texts is None:
        from drifting.kernels import drift_cuda

        return drift_cuda
    folder = scratch / f"build{index}"
    folder.mkdir()
    for name, text in texts.items():
        (folder / name).write_text(text)
    module_spec = importlib.util.spec_from_file_location(f"drift_cuda_build{index}", folder / "drift_cuda.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "norm_floats"):  # builds before the twenty-first sitting: R W floats, none for pass 1
        module.norm_floats = lambda c_n, r: r * module.norm_width(c_n)
    if "grad_factor" not in inspect.signature(module.launch).parameters:  # before the twenty-second sitting
        module.launch = _without_grad_factor(module.launch)
    return module


def _without_grad_factor(launch):
    """A build's launch from before the gradient's factor (drift_loss(reduction=...)): the library passes it, and the
    build can only write the gradient of the [B] losses, factor 1."""
    def adapted(*args, grad_factor: float = 1.0, **kwargs):
        if grad_factor != 1.0:
            raise ValueError(f"this build writes the gradient of the [B] losses only (factor 1), not {grad_factor}")
        return launch(*args, **kwargs)
    return adapted


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", help="directories with drift_cuda.{py,cu}, git:REV, or current")
    parser.add_argument("--problems", type=int, default=65536, help="problems of the 32x32 key (65,536 in a step)")
    parser.add_argument("--repeat", type=int, default=5, help="launches per timing (the median is reported)")
    parser.add_argument("--rounds", type=int, default=1, help="times through the list, every other one reversed")
    parser.add_argument("--out", help="a JSON file for the results")
    args = parser.parse_args(argv)
    for name in ("problems", "repeat", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    try:
        texts = [build_files(spec) for spec in args.builds]  # every build found before any work
    except ValueError as err:
        parser.error(str(err))
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the builds are CUDA kernels)")

    from drifting.drift import drift_loss
    from drifting.kernels import drift_triton
    from tune_drift_kernel import cuda_ms as timed, relative  # its median timing (after a warm-up) and error

    b, r = args.problems, len(TEMPERATURES)
    gen, pos, neg, neg_weight, kernel = key_problems(b)
    if kernel.cuda is None:
        parser.error("the library's CUDA kernel does not take these problems on this device (drift_cuda.supports)")
    c = kernel.cuda
    sums = kernel.scale_sums().sum(0)
    params = kernel.params(sums[0] / sums[1])
    leaf = gen.clone().requires_grad_()

    def call() -> None:
        leaf.grad = None
        loss, _ = drift_loss(leaf, pos, neg, neg_weight=neg_weight, temperatures=TEMPERATURES, impl="fused",
                             check_finite=False)
        loss.mean().backward()

    def passes(m: ModuleType, first: dict | None):
        """Passes 1-3 of build m timed alone (pass 3 at the first build's lambdas), their outputs, whether pass 3
        repeats bit for bit; the buffers are freed on return, before the whole call is timed."""
        def launch(pass_, out, lambdas, grad, norm):
            m.launch(pass_, c["gen"], c["pos"], c["neg"], c["weights"], c["temps"], lambdas, out, grad,
                     params if pass_ > 1 else kernel.dummy, norm, c["dummy"], **c["options"],
                     params_stride=0, lambda_stride=0)

        # the buffer the passes of a call share (pass 1 writes the targets' squared norms there, as in a call)
        width = r * m.norm_width(C_N)
        norm = torch.empty(b, m.norm_floats(C_N, r), device="cuda")
        ms1 = None
        if hasattr(m, "pass1_shared_bytes"):
            out1 = torch.empty(b, 2, device="cuda")
            ms1 = timed(lambda: launch(1, out1, kernel.dummy, None, norm), args.repeat)
        out2 = torch.empty(b, r + 1, device="cuda")
        ms2 = timed(lambda: launch(2, out2, kernel.dummy, None, norm), args.repeat)
        if first is None:
            lambdas = (out2[:, :r].double().sum(0) / (b * C_G * S)).sqrt().reciprocal().float()
        else:
            lambdas = first["lambdas"]
        loss, grad = torch.empty(b, device="cuda"), torch.empty_like(gen)
        ms3 = timed(lambda: launch(3, loss, lambdas, grad, norm), args.repeat)
        again = grad.clone()
        launch(3, loss, lambdas, grad, norm)
        outputs = dict(sq=out2[:, :r], loss=loss, grad=grad, norm=norm[:, :width], lambdas=lambdas)
        return (ms1, ms2, ms3), outputs, torch.equal(again, grad)

    print(f"{torch.cuda.get_device_name()}, {b} problems of the 32x32 key, median of {args.repeat}")
    print(f"{'build':28s} {'pass 1':>7s} {'pass 2':>7s} {'pass 3':>7s} {'call':>7s}  "
          "against the first build: sq / loss / grad / norm, repeats")
    rows, first = [], None
    library = drift_triton.drift_cuda
    with tempfile.TemporaryDirectory() as scratch:
        modules = [load_build(spec, text, Path(scratch), i) for i, (spec, text) in enumerate(zip(args.builds, texts))]
        order = list(range(len(modules)))
        for round_ in range(args.rounds):
            for i in order if round_ % 2 == 0 else order[::-1]:
                spec, m = args.builds[i], modules[i]
                (ms1, ms2, ms3), outputs, repeats = passes(m, first)
                first = first or outputs
                same_width = first["norm"].shape == outputs["norm"].shape
                errors = {k: relative(outputs[k], first[k]) for k in ("sq", "loss", "grad", "norm")
                          if k != "norm" or same_width}
                outputs = None  # the first build's stay in `first`
                drift_triton.drift_cuda = m  # the library's loss call, on this build
                try:
                    ms_call = timed(call, args.repeat)
                finally:
                    drift_triton.drift_cuda = library
                rows.append(dict(build=spec, round=round_, pass1_ms=ms1, pass2_ms=ms2, pass3_ms=ms3,
                                 call_ms=ms_call, errors=errors, repeats=repeats))
                shown = " / ".join(f"{errors[k]:.1e}" if k in errors else "-" for k in ("sq", "loss", "grad", "norm"))
                p1 = f"{ms1:7.3f}" if ms1 is not None else f"{'-':>7s}"
                print(f"{spec[-28:]:28s} {p1} {ms2:7.3f} {ms3:7.3f} {ms_call:7.2f}  {shown}, {repeats}", flush=True)
    result = dict(device=torch.cuda.get_device_name(), problems=b, repeat=args.repeat, rows=rows,
                  command=" ".join(sys.argv))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
