"""`drifting <command>`: the command-line interface.

Each command fills its frozen config dataclass from an optional YAML preset (`--preset`, a path or a name under
`configs/`) and `key=value` overrides (dotted for nested fields), saves the resolved config in its output folder and
calls one main function.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from drifting import __version__


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="YAML preset: a path, or a name under configs/ such as toy/ring8")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides applied after the preset, e.g. steps=500 target=ring8")


def _toy(args: argparse.Namespace) -> int:
    from drifting.config import load_config, resolve_preset, save_config
    from drifting.toy.train2d import ToyConfig, format_table, run_experiment

    preset = resolve_preset(args.preset) if args.preset else None
    cfg = load_config(ToyConfig, preset, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / "toy" / (cfg.target + (f"-{args.ablation}" if args.ablation
                                                                                  else ""))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    summary = run_experiment(cfg, out, ablation=args.ablation, progress=not args.no_progress)
    print(format_table(summary))
    print(f"wrote {out}/ (config.yaml, metrics.json, figures) in {time.perf_counter() - t0:.1f} s")
    return 0


def _run_training(args: argparse.Namespace, config_cls, train_main, folder: str, outputs: str) -> int:
    """Shared by `train` and `train-mae`: preset + overrides -> config, run folder, resume, final metrics."""
    from drifting.config import load_config, resolve_preset

    preset = resolve_preset(args.preset) if args.preset else None
    cfg = load_config(config_cls, preset, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / folder / (Path(args.preset).stem if args.preset else "debug")
    final = train_main(cfg, out, resume=not args.no_resume, progress=not args.no_progress)
    print(" ".join(f"{k}={v:.4g}" for k, v in final.items() if "/" not in k))  # per-key figures: metrics.jsonl
    print(f"wrote {out}/ ({outputs})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from drifting.train.gen import GenConfig, main

    return _run_training(args, GenConfig, main, "train", "config.yaml, metrics.jsonl, samples_*.png, checkpoints/, "
                                                         "ema.pt")


def _train_mae(args: argparse.Namespace) -> int:
    from drifting.train.mae import MAEConfig, main

    return _run_training(args, MAEConfig, main, "train-mae", "config.yaml, metrics.jsonl, checkpoints/, encoder.pt")


def _train_flow(args: argparse.Namespace) -> int:
    from drifting.train.flow import FlowConfig, main

    return _run_training(args, FlowConfig, main, "train-flow", "config.yaml, metrics.jsonl, samples_*_euler{1,50}.png, "
                                                              "checkpoints/, ema.pt")


def _sample_flow(args: argparse.Namespace) -> int:
    from drifting.train.flow import flow_sample_main

    path = flow_sample_main(args.ema, args.out, num_per_class=args.num_per_class, steps=args.steps, seed=args.seed,
                            batch=args.batch, device=args.device)
    print(f"wrote {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from drifting.eval.sample import sample_main

    path = sample_main(args.ema, args.out, num_per_class=args.num_per_class, alpha=args.alpha, seed=args.seed,
                       batch=args.batch, device=args.device, vae=args.vae, vae_scaling=args.vae_scaling)
    print(f"wrote {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from drifting.eval.metrics import eval_main

    result = eval_main(args.samples, evaluator=args.evaluator, ref=args.ref, data=args.data, ema=args.ema,
                       alphas=args.alphas, num_per_class=args.num_per_class, seed=args.seed, batch=args.batch,
                       out=args.out, floor=args.floor, neighbours=args.neighbours, device=args.device)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _train_evaluator(args: argparse.Namespace) -> int:
    from drifting.eval.evaluator import train_evaluator_main

    meta = train_evaluator_main(args.dataset, args.out, data=args.data, epochs=args.epochs, seed=args.seed,
                                device=args.device, progress=not args.no_progress)
    print({k: v for k, v in meta.items() if not isinstance(v, dict)})
    return 0


def _policy_train(argv: list[str]) -> int:
    from drifting.policy.train import cli

    cli(argv)
    return 0


def _policy_eval(argv: list[str]) -> int:
    from drifting.policy.evaluate import cli

    cli(argv)
    return 0


# Commands whose own argument parsers take the rest of the command line (`drifting policy-train --help` included).
DELEGATED = {"policy-train": _policy_train, "policy-eval": _policy_eval}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drifting", description="Drifting Models: one-step generators trained with a kernel drifting field.")
    parser.add_argument("--version", action="version", version=f"drifting {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    toy = commands.add_parser(
        "toy", help="2-D toy experiments (Figures 3 and 4; Table 1 and 11 ablations), a minute on a CPU",
        description="Train an MLP generator on a 2-D target from three initialisations (between the modes, far "
                    "away, collapsed on one mode); print energy distance, MMD and covered modes; write figures.")
    _add_config_arguments(toy)
    toy.add_argument("--out", help="output folder (default runs/toy/<target>[-<ablation>])")
    toy.add_argument("--ablation", choices=["antisymmetry", "normalization"],
                     help="train every variant of Table 1 (antisymmetry) or Table 11 (normalization) instead")
    toy.add_argument("--no-progress", action="store_true", help="no progress bars")
    toy.set_defaults(run=_toy)

    train = commands.add_parser(
        "train", help="train a one-step generator (default: a tiny DiT on a synthetic image set, seconds on a CPU)",
        description="Train a class-conditional one-step generator with the drifting loss. Runs on a CPU, one GPU, or "
                    "N GPUs under torchrun (DDP, or FSDP2 with train.strategy=fsdp); resumes from the output folder's last checkpoint.")
    _add_config_arguments(train)
    train.add_argument("--out", help="output folder (default runs/train/<preset>); resumed when it has checkpoints")
    train.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    mae = commands.add_parser(
        "train-mae", help="pre-train the ResNet-MAE feature encoder (default: a tiny one on the synthetic set)",
        description="Masked-autoencoder pre-training of the ResNet-MAE (2x2 cells masked at 50%%, loss on masked "
                    "cells, AdamW, EMA, optional classification fine-tune); exports the EMA encoder as encoder.pt "
                    "for `drifting train loss.encoder=... loss.encoder_weights=.../encoder.pt`.")
    _add_config_arguments(mae)
    mae.add_argument("--out", help="output folder (default runs/train-mae/<preset>); resumed when it has checkpoints")
    mae.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    mae.add_argument("--no-progress", action="store_true", help="no progress bar")
    mae.set_defaults(run=_train_mae)

    sample = commands.add_parser("sample", help="one-step samples of a trained generator (its ema.pt) to .npz + grid")
    sample.add_argument("ema", help="the ema.pt a training run wrote")
    sample.add_argument("--out", help="output .npz (default: beside ema.pt)")
    sample.add_argument("--num-per-class", type=int, default=1000)
    sample.add_argument("--alpha", type=float, default=1.0, help="guidance scale alpha >= 1 (1: no guidance)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch", type=int, default=256)
    sample.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    sample.add_argument("--vae", help="latent generators: the local AutoencoderKL folder that decodes samples to pixels")
    sample.add_argument("--vae-scaling", type=float, default=0.18215, help="the latent cache's scaling (meta.json)")
    sample.set_defaults(run=_sample)

    flow = commands.add_parser(
        "train-flow", help="train the flow-matching (rectified flow) baseline with the same generator network",
        description="Train the generator network as a rectified-flow velocity net (time through the alpha "
                    "embedding); sample grids with 1 and 50 Euler steps; exports ema.pt for `drifting sample-flow`.")
    _add_config_arguments(flow)
    flow.add_argument("--out", help="output folder (default runs/train-flow/<preset>); resumed when it has "
                                    "checkpoints")
    flow.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    flow.add_argument("--no-progress", action="store_true", help="no progress bar")
    flow.set_defaults(run=_train_flow)

    sflow = commands.add_parser("sample-flow", help="Euler samples of a flow baseline (its ema.pt) to .npz + grid")
    sflow.add_argument("ema", help="the ema.pt `drifting train-flow` wrote")
    sflow.add_argument("--steps", type=int, default=1, help="Euler steps (1: a one-step generator; e.g. 50)")
    sflow.add_argument("--out", help="output .npz (default: beside ema.pt, samples_euler<steps>.npz)")
    sflow.add_argument("--num-per-class", type=int, default=1000)
    sflow.add_argument("--seed", type=int, default=0)
    sflow.add_argument("--batch", type=int, default=256)
    sflow.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    sflow.set_defaults(run=_sample_flow)

    ev = commands.add_parser(
        "eval", help="FD-<evaluator>, accuracy, IS analogue, precision/recall of samples; guidance sweeps",
        description="Evaluate sample .npz files, or sample a generator over several guidance scales (--ema, --alphas)"
                    ", in the features of a project-trained evaluator classifier; --floor adds the real test split.")
    ev.add_argument("samples", nargs="*", help="sample .npz files (from `drifting sample`)")
    ev.add_argument("--evaluator", required=True, help="evaluator file, or a dataset name (mnist, fashion-mnist, "
                                                       "cifar10) for the committed one")
    ev.add_argument("--ref", help="reference statistics .npz (computed from the training split and written if absent)")
    ev.add_argument("--data", help="the dataset file/folder (for the reference, the floor and neighbours)")
    ev.add_argument("--ema", help="a generator's ema.pt, to sample for the guidance sweep")
    ev.add_argument("--alphas", help="comma list of guidance scales for the sweep, e.g. 1,1.5,2,3")
    ev.add_argument("--num-per-class", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch", type=int, default=500)
    ev.add_argument("--out", help="output folder for metrics.json/md, sweep table and plots")
    ev.add_argument("--floor", action="store_true", help="also evaluate the real test split (the floor)")
    ev.add_argument("--neighbours", type=int, default=0, help="draw a nearest-neighbour panel of N samples")
    ev.add_argument("--device")
    ev.set_defaults(run=_eval)

    te = commands.add_parser("train-evaluator", help="train the evaluator classifier of a dataset (fixed recipe)")
    te.add_argument("dataset", help="mnist, fashion-mnist or cifar10")
    te.add_argument("--out", help="weights file (default evaluators/<dataset>.pt)")
    te.add_argument("--data", help="the dataset file/folder")
    te.add_argument("--epochs", type=int, help="override the recipe's epochs (the committed ones use the recipe)")
    te.add_argument("--seed", type=int, default=0)
    te.add_argument("--device")
    te.add_argument("--no-progress", action="store_true")
    te.set_defaults(run=_train_evaluator)

    # Push-T (needs the `policy` extra); their own argument parsers take the rest of the command line
    pt = commands.add_parser("policy-train", add_help=False,
                             help="train a Push-T policy: Drifting Policy (1 step) or the DDPM baseline (100 steps)")
    pt.add_argument("args", nargs=argparse.REMAINDER)
    pe = commands.add_parser("policy-eval", add_help=False,
                             help="evaluate a Push-T policy under Diffusion Policy's protocol (50 seeded episodes)")
    pe.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as err:  # bad configuration or input: a message, not a traceback
        print(f"drifting {args.command}: error: {err}", file=sys.stderr)
        return 2
