"""Where the CUDA drift kernel's time goes, by line of drifting/kernels/drift_cuda.cu, from Nsight Compute's samples.

Two steps. On the GPU, under ncu, `run` launches passes 1, 2 and 3 once on problems of the 32x32 key (bf16, 64
generated, 16 unconditional and 64 positive rows, S = 256, temperatures 0.02, 0.05, 0.2, weights on the
unconditional rows), with the kernel compiled with line information (NVRTC's -lineinfo) and each pass's machine code
written to --cubins (pass1.cubin, ...). ncu's source page gives the warp-stall samples of every instruction:

    ncu --section SourceCounters --page source --print-source sass --csv -k regex:drift_kernel \\
        --launch-skip 1 --launch-count 1 python benchmarks/profile_drift_kernel.py run --cubins prof > pass2.csv

(--launch-skip 1 --launch-count 1: pass 2; 2 and 1: pass 3.) Then, anywhere, `lines` sums the samples by source line,
code inlined into the kernel counted at its call site, and names each line's leading stall reasons:

    python benchmarks/profile_drift_kernel.py lines pass2.csv prof/pass2.cubin

It needs nvdisasm (CUDA toolkit, or `pip download nvidia-cuda-nvdisasm`) for the cubin's line table, or the table
itself: `nvdisasm -gi -c pass2.cubin > pass2.sass`, then `lines pass2.csv pass2.sass`. Give --source the kernel's
source as it was when profiled (e.g. `git show REV:drifting/kernels/drift_cuda.cu`) if it has changed since.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "drifting" / "kernels" / "drift_cuda.cu"
SAMPLES = "Warp Stall Sampling (All Samples)"


def line_table(listing: str) -> dict[int, int]:
    """Instruction offset -> line of the kernel's own code (a call site for inlined code), from `nvdisasm -gi`."""
    table, line = {}, None
    for text in listing.splitlines():
        if "//##" in text:
            found = re.search(r"line (\d+)", text)
            inlined = re.findall(r"inlined at \"[^\"]*\", line (\d+)", text)
            if found:
                line = int(inlined[-1]) if inlined else int(found.group(1))
            continue
        offset = re.match(r"\s+/\*([0-9a-f]{4,})\*/", text)
        if offset and line is not None:
            table[int(offset.group(1), 16)] = line
    return table


def stall_lines(rows: list[list[str]], table: dict[int, int]) -> tuple[float, Counter, dict[int, Counter]]:
    """ncu's source-page rows (its CSV) summed by line: total samples, samples per line, stall reasons per line."""
    start = next((i for i, row in enumerate(rows) if row and row[0] == "Address"), None)
    if start is None:
        raise ValueError("no 'Address' header: expected ncu's source page as CSV (--page source --csv)")
    header, body = rows[start], [row for row in rows[start + 1:] if len(row) == len(rows[start])]
    column = {name: i for i, name in enumerate(header)}
    if SAMPLES not in column:
        raise ValueError(f"no {SAMPLES!r} column: profile with --section SourceCounters")
    reasons = [name for name in header if name.startswith("stall_") and "(" not in name]
    base = int(body[0][0], 16)
    total, per_line, why = 0.0, Counter(), defaultdict(Counter)
    for row in body:
        samples = float(row[column[SAMPLES]] or 0)
        total += samples
        line = table.get(int(row[0], 16) - base)
        if line is None:
            continue
        per_line[line] += samples
        for name in reasons:
            why[line][name[6:]] += float(row[column[name]] or 0)
    return total, per_line, why


def report(total: float, per_line: Counter, why: dict[int, Counter], source: list[str], top: int) -> str:
    out = [f"{total:.0f} samples; by line of the kernel (inlined code at its call site), % of all samples:"]
    for line, samples in per_line.most_common(top):
        text = source[line - 1].strip()[:72] if line <= len(source) else "?"
        reasons = " ".join(f"{name} {value / total:.1%}" for name, value in why[line].most_common(4) if value)
        out.append(f"{samples / total:6.1%}  L{line:<5d} {text:<72}  {reasons}")
    return "\n".join(out)


def run(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("run: needs a CUDA GPU (and ncu around it to be of use)")
    from drift_cuda_builds import key_problems  # the same problems as the builds' comparison

    from drifting.kernels import drift_cuda, drift_triton
    folder = Path(args.cubins)
    folder.mkdir(parents=True, exist_ok=True)
    compile_ = drift_cuda.nvrtc_cubin

    def with_lines(source, name, arch, library=None, options=()):  # -lineinfo, and the machine code kept
        cubin, lowered = compile_(source, name, arch, library, (*options, "-lineinfo"))
        (folder / f"pass{name.split('<')[1].split(',')[0]}.cubin").write_bytes(cubin)
        return cubin, lowered

    drift_cuda.nvrtc_cubin = with_lines
    drift_triton.VARIANT["cuda"] = True
    b = args.problems
    gen, _, _, _, kernel = key_problems(b)
    if kernel.cuda is None:
        sys.exit("run: the CUDA kernel does not take these problems on this GPU (drift_cuda.supports)")
    norm = kernel.norm_buffer()  # shared by the three passes, as in a call
    sums = kernel.scale_sums(norm).sum(0)  # pass 1
    scale = sums[0] / sums[1]
    squares = kernel.square_sums(scale, norm).sum(0)  # pass 2
    inv_lambda = (squares[:-1] / squares[-1]).sqrt().reciprocal().float()
    loss, grad = torch.empty(b, device="cuda"), torch.empty_like(gen)
    kernel.launch(3, loss, kernel.params(scale), inv_lambda, grad, norm)  # pass 3
    torch.cuda.synchronize()
    print(f"{b} problems, mean loss {loss.mean().item():.6g}; cubins in {folder}")


def lines(args) -> None:
    machine = Path(args.machine_code)
    if machine.suffix == ".cubin":
        nvdisasm = args.nvdisasm or shutil.which("nvdisasm")
        if nvdisasm is None:
            sys.exit("lines: needs nvdisasm for a .cubin (--nvdisasm PATH), or its `nvdisasm -gi -c` listing instead")
        listing = subprocess.run([nvdisasm, "-gi", "-c", str(machine)], capture_output=True, text=True,
                                 check=True).stdout
    else:
        listing = machine.read_text()
    table = line_table(listing)
    if not table:
        sys.exit(f"lines: no line information in {machine}: compile with -lineinfo (the `run` step does)")
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    try:
        total, per_line, why = stall_lines(rows, table)
    except ValueError as error:
        sys.exit(f"lines: {args.csv}: {error}")
    print(report(total, per_line, why, Path(args.source).read_text().splitlines(), args.top))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    launch = steps.add_parser("run", help="passes 1-3 once, compiled with line information (on the GPU, under ncu)")
    launch.add_argument("--problems", type=int, default=4096)
    launch.add_argument("--cubins", required=True, help="folder for pass1.cubin, pass2.cubin, pass3.cubin")
    summary = steps.add_parser("lines", help="ncu's samples summed by source line")
    summary.add_argument("csv", help="ncu's source page of one pass (--page source --print-source sass --csv)")
    summary.add_argument("machine_code", help="that pass's .cubin from `run`, or its `nvdisasm -gi -c` listing")
    summary.add_argument("--source", default=str(SOURCE), help="drift_cuda.cu as profiled (default: today's)")
    summary.add_argument("--nvdisasm", help="nvdisasm's path (default: from PATH)")
    summary.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if args.step == "run" and args.problems < 1:
        parser.error(f"--problems: expected a positive integer, got {args.problems}")
    if args.step == "lines":
        if args.top < 1:
            parser.error(f"--top: expected a positive integer, got {args.top}")
        for name in ("csv", "machine_code", "source"):
            if not Path(getattr(args, name)).is_file():
                parser.error(f"{name}: no such file: {getattr(args, name)}")
    (run if args.step == "run" else lines)(args)


if __name__ == "__main__":
    main()
