"""How much the drifting loss's gradient depends on the guidance weight, raw key against encoder keys.

    python scripts/guidance_gradient.py --ema RUN/ema.pt --data PATH/mnist.npz --encoder mae_mnist \
        --encoder-weights MAE_RUN/encoder.pt

A diagnostic for the observation of docs/results.md that guidance stops working once the MAE keys join. On one
batch of a trained generator's samples (alpha = 1), real positives and unconditional real samples, it computes the
gradient of the loss with respect to the generated samples twice, with the guidance weight of alpha = 1 (w = 0)
and of alpha = --alpha, and reports for the raw key ("global") and for the encoder's keys (the rest) the gradient's
norm and how much it changes with w: |g(alpha) - g(1)| / |g(1)|. Same samples, same positives, same negatives:
only w differs.
"""

from __future__ import annotations

import argparse
import json

import torch

from drifting.data.datasets import load_mnist_npz, to_float
from drifting.eval.sample import load_generator
from drifting.guidance import guidance_weight
from drifting.models.generate import generate
from drifting.train.gen import LossConfig, build_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ema", required=True, help="a generator's ema.pt")
    p.add_argument("--data", required=True, help="mnist.npz")
    p.add_argument("--encoder", default="mae_mnist")
    p.add_argument("--encoder-weights", required=True, help="the encoder.pt of drifting train-mae")
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument("--gen-per-class", type=int, default=32)
    p.add_argument("--pos-per-class", type=int, default=32)
    p.add_argument("--uncond-per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for name in ("gen_per_class", "pos_per_class", "uncond_per_class"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not args.alpha > 1:
        p.error(f"--alpha: expected > 1, got {args.alpha}")

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = load_generator(args.ema)
    images, labels = load_mnist_npz(args.data)
    classes = torch.arange(model.num_classes)
    n_c, c_g, c_p, c_n = len(classes), args.gen_per_class, args.pos_per_class, args.uncond_per_class
    with torch.no_grad():
        gen = generate(model, classes.repeat_interleave(c_g), 1.0, generator=g).float()
    pos = torch.cat([images[(labels == c).nonzero()[torch.randperm(int((labels == c).sum()), generator=g)[:c_p], 0]]
                     for c in classes])
    neg = images[torch.randperm(len(images), generator=g)[:n_c * c_n]]
    pos, neg = to_float(pos), to_float(neg)
    shape = tuple(gen.shape[1:])
    raw = build_loss(LossConfig(impl="reference"), shape, torch.device("cpu"))
    full = build_loss(LossConfig(encoder=args.encoder, encoder_weights=args.encoder_weights, impl="reference"), shape,
                      torch.device("cpu"))

    def grad(loss_fn, alpha: float) -> torch.Tensor:
        x = gen.clone().requires_grad_()
        w = torch.full((n_c,), guidance_weight(alpha, c_g, c_n))
        loss, _ = loss_fn(x, pos, neg, w)
        (g_x,) = torch.autograd.grad(loss, x)
        return g_x

    out = {}
    g_raw = {a: grad(raw, a) for a in (1.0, args.alpha)}
    g_all = {a: grad(full, a) for a in (1.0, args.alpha)}
    g_enc = {a: g_all[a] - g_raw[a] for a in g_all}  # the keys are summed: the encoder keys' part
    for name, gs in (("raw key", g_raw), ("encoder keys", g_enc), ("all keys", g_all)):
        base = gs[1.0].norm().item()
        out[name] = {"grad_norm_alpha1": base, f"grad_norm_alpha{args.alpha:g}": gs[args.alpha].norm().item(),
                     "relative_change": (gs[args.alpha] - gs[1.0]).norm().item() / base}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
