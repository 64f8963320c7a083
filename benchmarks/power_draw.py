"""The GPU's clocks, power draw and throttle reasons while a command runs (nvidia-smi sampled in the background).

Back-to-back calls of the drifting loss's large keys draw an H200 up to its power limit (700 W): the driver then
lowers the SM clock (throttle reason "sw_power_cap"), and each call gets slower the longer the calls run. This
script shows whether a timing was taken at full clock or under the cap:

    python benchmarks/power_draw.py -- python benchmarks/drift_loss.py --impls fused --keys 32x32 --repeat 200
    python benchmarks/power_draw.py --out power.csv -- python benchmarks/drift_loss.py --keys 32x32 --idle-ms 25

It runs the command as it is (its output passes through), samples every --interval-ms, and prints the SM clock,
power draw and the share of busy samples (power above a quarter of the limit) under each throttle reason.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile

QUERY = "clocks.sm,power.draw,enforced.power.limit,temperature.gpu,clocks_event_reasons.active"
# the bits of clocks_event_reasons.active (nvidia-smi --help-query-gpu) that slow a busy GPU down
REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
           0x80: "hw_power_brake_slowdown"}


def parse_samples(lines: list[str]) -> list[dict]:
    """nvidia-smi's CSV lines (no header, no units) as dicts; lines it could not fill ("[N/A]") are left out."""
    samples = []
    for line in lines:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue
        try:
            clock, power, limit, temperature = (float(f) for f in fields[:4])
            reasons = int(fields[4], 16)
        except ValueError:
            continue
        samples.append(dict(clock_mhz=clock, power_w=power, limit_w=limit, temperature_c=temperature,
                            reasons=reasons))
    return samples


def summary(samples: list[dict]) -> dict:
    """Over the busy samples (power above a quarter of the limit): SM clock (median, lowest), power (median,
    highest) and the share of them under each throttle reason."""
    busy = [s for s in samples if s["power_w"] > s["limit_w"] / 4]
    result = {"samples": len(samples), "busy_samples": len(busy)}
    if busy:
        clocks, powers = [s["clock_mhz"] for s in busy], [s["power_w"] for s in busy]
        result.update(clock_mhz_median=statistics.median(clocks), clock_mhz_lowest=min(clocks),
                      power_w_median=statistics.median(powers), power_w_highest=max(powers),
                      limit_w=busy[0]["limit_w"], temperature_c_highest=max(s["temperature_c"] for s in busy))
        result["throttled_share"] = {name: sum(bool(s["reasons"] & bit) for s in busy) / len(busy)
                                     for bit, name in REASONS.items()}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-ms", type=int, default=50, help="sampling interval of nvidia-smi")
    parser.add_argument("--out", help="also keep the raw samples (CSV) here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("command: expected the command to run after --")
    if args.interval_ms < 1:
        parser.error(f"--interval-ms: expected a positive integer, got {args.interval_ms}")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        parser.error("needs nvidia-smi (an NVIDIA GPU's driver tools)")
    with tempfile.TemporaryFile("w+") as raw:
        sampler = subprocess.Popen([smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                    "-lms", str(args.interval_ms)], stdout=raw)
        try:
            code = subprocess.call(command)
        finally:
            sampler.terminate()
            sampler.wait()
        raw.seek(0)
        lines = raw.read().splitlines()
    if args.out:
        with open(args.out, "w") as f:
            f.write(QUERY + "\n" + "\n".join(lines) + "\n")
    result = summary(parse_samples(lines))
    result["command"] = " ".join(command)
    result["returncode"] = code
    print(f"power_draw: {result['busy_samples']} busy samples of {result['samples']}", end="")
    if result["busy_samples"]:
        shares = ", ".join(f"{name} {share:.0%}" for name, share in result["throttled_share"].items() if share)
        print(f"; SM clock median {result['clock_mhz_median']:.0f} MHz (lowest {result['clock_mhz_lowest']:.0f}),"
              f" power median {result['power_w_median']:.0f} W (highest {result['power_w_highest']:.0f} of "
              f"{result['limit_w']:.0f}); throttled: {shares or 'never'}")
    else:
        print()
    if code:
        sys.exit(code)
    return result


if __name__ == "__main__":
    main()
