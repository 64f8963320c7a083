"""Training curves of generator runs from their metrics.jsonl: the drift RMS of one key per temperature (the numbers
that show progress; the loss is ~constant by construction), the key's distance scale and the gradient norm.

    python scripts/plot_curves.py runs/a/metrics.jsonl runs/b/metrics.jsonl --labels raw,mae --out curves.png
    python scripts/plot_curves.py RUN/metrics.jsonl --key layer4_mean --out curves.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from drifting.train.log import read_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files of `drifting train` runs")
    p.add_argument("--labels", help="comma list, one per file (default: the run folders' names)")
    p.add_argument("--key", default="global", help="the feature key whose drift RMS and scale are drawn")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    labels = args.labels.split(",") if args.labels else [m.parent.name for m in args.metrics]
    if len(labels) != len(args.metrics):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(args.metrics)} files")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rms, ax_scale, ax_grad) = plt.subplots(1, 3, figsize=(14, 3.8))
    for path, label in zip(args.metrics, labels):
        rows = [r for r in read_metrics(path) if "grad_norm" in r]
        if not rows:
            raise SystemExit(f"{path}: no training rows (grad_norm) in it")
        steps = [r["step"] for r in rows]
        temps = sorted({k.split("/")[0][len("drift_rms_"):] for k in rows[0] if k.startswith("drift_rms_")}, key=float)
        for tau in temps:
            name = f"drift_rms_{tau}/{args.key}"
            if name not in rows[0]:
                raise SystemExit(f"{path}: no {name!r} (keys are logged as drift_rms_<tau>/<key>)")
            ax_rms.plot(steps, [max(r[name], 1e-20) for r in rows], label=f"{label}, tau {tau}")
        ax_scale.plot(steps, [r[f"scale/{args.key}"] for r in rows], label=label)
        ax_grad.plot(steps, [r["grad_norm"] for r in rows], label=label)
    ax_rms.set(yscale="log", xlabel="step", title=f"drift RMS per temperature ({args.key})")
    ax_scale.set(xlabel="step", title=f"distance scale ({args.key})")
    ax_grad.set(yscale="log", xlabel="step", title="gradient norm (before clipping)")
    for ax in (ax_rms, ax_scale, ax_grad):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
