"""One generator training step of a preset, timed whole and by phase: samples/s, MFU, peak memory, time split.

    python benchmarks/train_step.py                                  # the ablation step (issue 10) on one GPU
    python benchmarks/train_step.py --out one.json
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=4 benchmarks/train_step.py --baseline one.json --out four.json
    python benchmarks/train_step.py --preset configs/gen/debug.yaml --device cpu --iters 2   # smoke test, seconds

The step is the trainer's (drifting/train/gen.py), on random data of the preset's shape held in the queues (the
benchmark needs no dataset): push real samples, draw classes, alpha, positives, unconditional samples and noise;
generate; FeatureDriftLoss (encoders on real and generated samples, the drifting loss per key); backward; clip;
AdamW; EMA. With --class-chunk the classes of each process run in chunks with gradient accumulation, the global
statistics first, exactly as the trainer does.

Two measurements:
- whole steps, no synchronisation inside: ms per step and samples/s (generated samples, all processes);
- the same steps with a CUDA synchronisation between phases, for the split: data (queue push and draws), generator
  forward, encoders forward (the loss call's, timed alone on inputs of the same shapes: the generated samples, and
  the real ones unless train.stats_keep_features had the statistics pass encode them), drifting loss (the loss call
  minus the encoders' forward), backward (encoder and generator), optimiser (clip, AdamW, EMA).
MFU counts, as issue 10 asks: generator forward + backward, encoder forward on the real samples, encoder forward +
backward on the generated samples (torch.utils.flop_counter, matmuls and convolutions), against the card's dense bf16
peak (H100/H200 SXM: 989 TFLOP/s; --peak-tflops for other cards).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from kernel_classes import device_ms_by_class, format_classes  # benchmarks/kernel_classes.py

from drifting.config import load_config
from drifting.data.datasets import to_float
from drifting.data.queue import SampleQueue
from drifting.drift import all_reduce_sum
from drifting.feature_loss import RANGES, ClassBatch
from drifting.guidance import guidance_weight, sample_alpha
from drifting.kernels import kernel_variant
from drifting.models.dit import GENERATORS
from drifting.models.generate import draw_inputs
from drifting.train import dist
from drifting.train.ema import ema_copy, ema_update
from drifting.train.gen import NOISE_PURPOSE, GenConfig, build_loss, build_model, step_generator
from drifting.train.parallel import set_gradient_sync, wrap_model

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # as benchmarks/generator_step.py

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM)
REPO = Path(__file__).resolve().parents[1]


# The step's phases as profiler ranges (the backward's kernels are launched from autograd's thread while the main
# thread waits inside its range: range_device_ms attributes kernels by launch time, so they count).
STEP_RANGES = ("statistics pass: generator", "statistics pass: loss.stats", "generator forward", "loss call",
               "backward", "optimiser")


def range_device_ms(raw_events, names) -> dict[str, dict[str, float]]:
    """Per named range: "gpu", the milliseconds of the device's kernels, copies and fills launched (on any thread)
    while it was open, and "host", the milliseconds it was open. raw_events: the profiler's kineto events
    (`prof.profiler.kineto_results.events()`): each device event is matched to its launch by its CUPTI correlation
    id, so it counts once (torch's FunctionEvent tree can hand a range a whole GPU span as one legacy "kernel")."""
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    launched_at: dict[int, int] = {}  # correlation id -> launch time (ns) of the host's runtime call
    device = []  # (correlation id, duration ns)
    for e in raw_events:
        if e.device_type() == DeviceType.CPU:
            if e.name() in spans:
                spans[e.name()].append((e.start_ns(), e.end_ns()))
            elif e.correlation_id() and e.linked_correlation_id():  # a runtime call that launched device work
                launched_at[e.correlation_id()] = e.start_ns()
        elif not e.is_user_annotation():
            device.append((e.correlation_id(), e.duration_ns()))
    launches = [(launched_at[c], ns) for c, ns in device if c in launched_at]
    matched = {"(all device work matched to a launch)": {"gpu": sum(ns for _, ns in launches) / 1e6, "host": 0.0}}
    return matched | {name: {"gpu": sum(ns for t, ns in launches if any(a <= t <= b for a, b in spans[name])) / 1e6,
                   "host": sum(b - a for a, b in spans[name]) / 1e6}
            for name in names if spans[name]}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=str(REPO / "configs/gen/ablation.yaml"))
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.classes=32 model.bf16=false")
    p.add_argument("--class-chunk", type=int, help="classes per gradient-accumulation chunk on each process")
    p.add_argument("--device", help="cpu or cuda (default: this process's GPU when there is one)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="torch.compile the generator")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode for the generator (--compile) and the encoders "
                        "(train.compile_encoder=true); benchmarks/generator_step.py says why these two")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: known H100/H200/A100)")
    p.add_argument("--baseline", help="the JSON of a 1-GPU run: report the scaling efficiency against it")
    p.add_argument("--out", help="write the results as JSON")
    p.add_argument("--profile", help="also profile one step (torch.profiler) and write its table of operators here")
    p.add_argument("--reference-keys", action="store_true",
                   help="the taps' statistics keys on the reference reductions, not the fused kernel (the drift math "
                        "keeps loss.impl): the baseline of the fused keys")
    p.add_argument("--reference-layout", action="store_true",
                   help="the keys' vectors laid out as problems by torch's copy, not the layout kernel (its baseline)")
    p.add_argument("--fp32-taps", action="store_true",
                   help="the encoder's taps as autocast leaves them (fp32 GroupNorm outputs), not in bf16 (the baseline "
                        "of FeatureDriftLoss.taps_in_autocast_dtype)")
    p.add_argument("--rope-per-call", action="store_true",
                   help="the DiT's RoPE tables built in every forward, not read from its buffers (the baseline of "
                        "the buffered tables)")
    p.add_argument("--encoder-channels-last", action="store_true",
                   help="the tap encoders' weights (and so their convolutions' outputs) in channels-last memory: no "
                        "NCHW <-> NHWC conversions around cuDNN's bf16 convolutions, and taps whose per-location "
                        "vectors are contiguous")
    p.add_argument("--encoder-dynamic", action="store_true",
                   help="with train.compile_encoder=true: the encoders' taps compiled with torch.compile's automatic "
                        "dynamic shapes (the baseline of compile_encoders' static shapes, under which inductor lays "
                        "out the convolutions channels-last)")
    p.add_argument("--kernel-variant", type=kernel_variant, default="",
                   help="drift_triton.VARIANT items for the fused loss, e.g. fp32_dot=tf32x3,fp32_block_s=64")
    return p.parse_args()


def main() -> None:
    args = parse()
    device = dist.init_distributed()
    if args.device:
        device = torch.device(args.device)
    rank, world = dist.rank(), dist.world_size()
    cuda = device.type == "cuda"
    overrides = list(args.overrides)
    if args.class_chunk:
        overrides.append(f"train.class_chunk={args.class_chunk}")
    base = load_config(GenConfig, args.preset, [*overrides, "data.path=unused"])
    if base.loss.encoder is not None and base.loss.encoder_weights is None:
        overrides.append("loss.encoder_weights=random")  # the weights do not change the cost
    cfg = load_config(GenConfig, args.preset, [*overrides, "data.path=unused"])
    t = cfg.train
    preset = GENERATORS[cfg.model.generator]
    shape = (preset.in_channels, preset.image_size, preset.image_size)
    num_classes = preset.num_classes
    local = t.classes // world
    chunk = t.class_chunk or local
    if t.classes % world or local % chunk:
        raise SystemExit(f"train.classes={t.classes} must split over {world} processes into chunks of {chunk}")
    if args.encoder_dynamic and not t.compile_encoder:
        raise SystemExit("--encoder-dynamic: expected train.compile_encoder=true (it sets how the encoders compile)")
    if args.compile_mode != "default" and not (args.compile or t.compile_encoder):
        raise SystemExit("--compile-mode: expected --compile or train.compile_encoder=true (what it compiles)")

    torch.manual_seed(t.seed)
    model = build_model(cfg, num_classes, shape).to(device)
    if args.rope_per_call:
        if not hasattr(model, "rope_tables"):
            raise SystemExit(f"--rope-per-call: the generator {cfg.model.generator} has no RoPE tables")
        model.rope = lambda: model.rope_tables(model.rope_cos.device)
    ema = ema_copy(model)
    train_model = wrap_model(model, strategy=t.strategy if world > 1 else "none", device=device)
    if args.compile:
        train_model = torch.compile(train_model, mode=args.compile_mode)
    own_encoder_compile = args.encoder_dynamic or args.compile_mode != "default"
    loss_fn = build_loss(cfg.loss, shape, device, compile_encoder=t.compile_encoder and not own_encoder_compile)
    if t.compile_encoder and own_encoder_compile:
        # dynamic=None: torch.compile's default (static, then dynamic after a new shape), the baseline of static
        loss_fn.compile_encoders(mode=args.compile_mode, **({"dynamic": None} if args.encoder_dynamic else {}))
    if args.reference_keys:
        loss_fn.fused_keys = False
    if args.reference_layout:
        loss_fn.fused_layout = False
    if args.encoder_channels_last:
        for encoder in loss_fn.encoders:
            encoder.to(memory_format=torch.channels_last)
    if args.fp32_taps:
        loss_fn.taps_in_autocast_dtype = False
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
    # Random "real" samples of the right shape fill the queues (float latents; pixels are stored as uint8).
    pixels = cfg.data.dataset != "latents"
    storage = torch.uint8 if pixels else torch.float32
    queue = SampleQueue(num_classes, shape, per_class=t.queue_per_class, unconditional=t.queue_uncond,
                        dtype=storage, device=device)
    g0 = torch.Generator().manual_seed(0)

    def random_real(n: int) -> torch.Tensor:
        if pixels:
            return torch.randint(0, 256, (n, *shape), generator=g0, dtype=torch.uint8)
        return torch.randn(n, *shape, generator=g0)

    def to_model(x: torch.Tensor) -> torch.Tensor:
        return to_float(x) if pixels else x.float()

    for c0 in range(0, num_classes, 64):  # fill every class ring once
        labels = torch.arange(c0, min(c0 + 64, num_classes)).repeat_interleave(t.queue_per_class)
        queue.push(random_real(len(labels)).to(device), labels.to(device))
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda and cfg.model.bf16 else nullcontext()
    reduce = all_reduce_sum() if world > 1 else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step(step_index: int, times: dict | None = None) -> None:
        """The trainer's step; with `times`, synchronise and record each phase's seconds."""
        clock = [time.perf_counter()]

        def mark(name: str) -> None:
            if times is not None:
                sync()
                now = time.perf_counter()
                times[name] = times.get(name, 0.0) + now - clock[0]
                clock[0] = now

        g_push, g_step = step_generator(t.seed, step_index, 0), step_generator(t.seed, step_index, 1)
        idx = torch.randint(num_classes, (t.push_per_step,), generator=g_push)
        queue.push(random_real(t.push_per_step).to(device, non_blocking=True), idx)
        classes = torch.randperm(num_classes, generator=g_step)[: t.classes]
        alpha = sample_alpha(t.classes, power=cfg.guidance.power, alpha_min=cfg.guidance.alpha_min,
                             alpha_max=cfg.guidance.alpha_max, no_guidance_frac=cfg.guidance.no_guidance_frac,
                             generator=g_step)
        w = guidance_weight(alpha, t.gen_per_class, t.uncond_per_class)
        pos = queue.sample_positive(classes, t.pos_per_class, g_step)
        neg = queue.sample_unconditional(t.classes, t.uncond_per_class, g_step) if t.uncond_per_class else None
        noise, style = draw_inputs(model, t.classes * t.gen_per_class, device=device,  # as the trainer
                                   generator=step_generator(t.seed, step_index, NOISE_PURPOSE, device))
        classes_d, alpha_d, w_d = (x.to(device, non_blocking=True) for x in (classes, alpha, w))  # as the trainer
        mark("data")

        def chunk_inputs(k: int):
            c = slice(rank * local + k * chunk, rank * local + (k + 1) * chunk)
            s = slice(c.start * t.gen_per_class, c.stop * t.gen_per_class)
            cls = classes_d[c].repeat_interleave(t.gen_per_class)
            a = alpha_d[c].repeat_interleave(t.gen_per_class)
            real_neg = to_model(neg[c].flatten(0, 1)) if neg is not None else None
            return (noise[s], cls, a, None if style is None else style[s]), to_model(pos[c].flatten(0, 1)), \
                real_neg, w_d[c]

        def generate(inputs):
            with autocast:
                return train_model(*inputs).float()

        n_chunks = local // chunk
        stats = None
        if n_chunks > 1:
            with torch.no_grad():
                with record_function("statistics pass: generator"):
                    batches = [ClassBatch(generate(i), p, n, wk) for i, p, n, wk in map(chunk_inputs, range(n_chunks))]
                with autocast, record_function("statistics pass: loss.stats"):
                    stats = loss_fn.stats(batches, all_reduce=reduce, keep_sources=t.stats_keep_features,
                                         group_keys=t.stats_group_keys, fused_min_problems=t.stats_fused_min_problems,
                                         compiled=t.stats_compiled, stack_below=t.stats_stack_below,
                                         stacked_losses=t.stats_stacked_losses, cuda_graph=t.stats_cuda_graph,
                                         total_classes=t.classes)  # as the trainer
            mark("statistics pass")
        opt.zero_grad(set_to_none=True)
        for k in range(n_chunks):
            inputs, p, n, wk = chunk_inputs(k)
            with set_gradient_sync(train_model, k == n_chunks - 1):
                with record_function("generator forward"):
                    x = generate(inputs)
                mark("generator forward")
                with autocast, record_function("loss call"):
                    loss, _ = loss_fn(x, p, n, wk, stats=stats, all_reduce=reduce if stats is None else None,
                                      total_classes=t.classes if stats is None else None,  # as the trainer
                                      chunk=k, group_keys=t.loss_group_keys and stats is not None,
                                      cuda_graph=t.loss_cuda_graph and stats is not None)
                mark("loss call")
                with record_function("backward"):
                    (loss * world).backward()
                mark("backward")
        with record_function("optimiser"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            ema_update({0.999: ema}, model, {0.999: 0.999})
        mark("optimiser")

    # Whole steps.
    for i in range(args.warmup):
        step(i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.iters):
        step(args.warmup + i)
    sync()
    step_s = (time.perf_counter() - t0) / args.iters
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    # The split, with synchronisation between phases.
    times: dict[str, float] = {}
    for i in range(args.iters):
        step(10_000 + i, times)
    split = {k: v / args.iters for k, v in times.items()}
    # The encoders' forward that one chunk's loss call runs, alone, on inputs of the same shapes: the generated
    # samples', and the real samples' unless the statistics pass kept their taps (stats_keep_features with more than
    # one chunk: the loss call then reads them).
    real_in_loss_call = not (t.stats_keep_features and local // chunk > 1)
    inputs_real = torch.randn(chunk * (t.pos_per_class + t.uncond_per_class), *shape, device=device)
    inputs_gen = torch.randn(chunk * t.gen_per_class, *shape, device=device, requires_grad=True)

    def encoders_forward(x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for e in loss_fn.encoders:
            outs += list((e.feature_sets(x) if hasattr(e, "feature_sets") else e.taps(x)).values())
        return outs

    enc_s = 0.0
    if loss_fn.encoders:
        for i in range(args.iters + 1):
            sync()
            t1 = time.perf_counter()
            if real_in_loss_call:
                with torch.no_grad(), autocast:
                    encoders_forward(inputs_real)
            with autocast:
                encoders_forward(inputs_gen)
            sync()
            if i:  # the first is a warm-up
                enc_s += time.perf_counter() - t1
        enc_s = enc_s / args.iters * (local // chunk)
    split["encoders forward"] = enc_s
    split["drifting loss"] = split.pop("loss call") - enc_s

    if args.profile:  # one more step under the profiler: which operators take the time, by GPU time
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            step(20_000)
            sync()
            wall_ms = (time.perf_counter() - start) * 1e3
        averages = prof.key_averages()
        # The GPU's busy time (the kernels' own time, one stream) against the wall time of the step: a step far
        # longer than its kernels is bound by the host (Python and kernel launches), not by the GPU.
        device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA
                         and not getattr(e, "is_user_annotation", False) and "annotation" not in e.name]
        busy_ms = sum(e.time_range.elapsed_us() for e in device_events) / 1e3
        launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                               "cudaLaunchKernelExC"))
        syncs = sum(e.count for e in averages if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        head = (f"profiled step: {wall_ms:.0f} ms wall, {busy_ms:.0f} ms of GPU kernels ({busy_ms / wall_ms:.0%}), "
                f"{launches} kernel launches, {syncs} host syncs\n\n")
        # The GPU time of the kernels launched inside each named range (the step's phases above and the parts of
        # FeatureDriftLoss): a split of the step that host-side noise does not move, unlike the synchronised one.
        ranges = range_device_ms(prof.profiler.kineto_results.events(), STEP_RANGES + RANGES)
        head += ("GPU time by range (kernels launched while it was open; the loss's parts nest inside the phases),"
                 " share of the GPU's busy time, and the range's host time\n")
        head += "".join(f"  {name:<52} {r['gpu']:9.1f} ms {r['gpu'] / max(busy_ms, 1e-9):6.1%}  "
                        f"host {r['host']:9.1f} ms\n" for name, r in ranges.items()) + "\n"
        by_class = device_ms_by_class(device_events)
        head += format_classes(by_class) + "\n"
        table = averages.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=60,
                               max_name_column_width=70)
        host = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
        if dist.is_main():
            Path(args.profile).write_text(head + table + "\n\nBy host time:\n" + host + "\n")
            print(head.strip())

    # FLOPs of one process's step (issue 10's count): counted on one class's samples (every count is linear in the
    # batch) and multiplied by the process's classes, so that counting needs little memory beside the step's.
    flops = {}
    with FlopCounterMode(display=False) as counter:
        inputs = generator_inputs(model, t.gen_per_class, device)
        with autocast:
            out = model(*inputs).float()
        out.square().mean().backward()
    flops["generator fwd+bwd"] = counter.get_total_flops() * local
    opt.zero_grad(set_to_none=True)
    if loss_fn.encoders:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast:
            encoders_forward(inputs_real[: t.pos_per_class + t.uncond_per_class])
        flops["encoder fwd (real)"] = counter.get_total_flops() * local
        with FlopCounterMode(display=False) as counter:
            with autocast:
                outs = encoders_forward(inputs_gen[: t.gen_per_class])
            sum(o.float().square().mean() for o in outs).backward()
        flops["encoder fwd+bwd (generated)"] = counter.get_total_flops() * local
    total_flops = sum(flops.values())
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in card), float("nan"))
    mfu = total_flops / step_s / (peak * 1e12)
    samples_per_s = t.classes * t.gen_per_class / step_s
    result = {
        "card": card, "world": world, "torch": torch.__version__, "preset": args.preset, "overrides": overrides,
        "compile": args.compile, "compile_mode": args.compile_mode, "kernel_variant": args.kernel_variant,
        "reference_keys": args.reference_keys, "fp32_taps": args.fp32_taps,
        "rope_per_call": args.rope_per_call, "encoder_channels_last": args.encoder_channels_last,
        "encoder_dynamic": args.encoder_dynamic,
        "reference_layout": args.reference_layout,
        "classes": t.classes, "class_chunk": chunk, "gen_per_class": t.gen_per_class,
        "real_encoded_in_loss_call": real_in_loss_call,
        "step_ms": 1e3 * step_s, "samples_per_s": samples_per_s, "peak_gib": peak_gib,
        "tflop_per_step_per_process": total_flops / 1e12, "mfu": mfu, "flops": flops,
        "split_ms": {k: 1e3 * v for k, v in split.items()},
    }
    if args.profile:
        result["profile"] = {"wall_ms": wall_ms, "gpu_busy_ms": busy_ms, "gpu_ms_by_range": ranges,
                             "gpu_ms_by_kernel_class": {cls: ms for cls, (ms, _) in by_class.items()}}
    if args.baseline:
        one = json.loads(Path(args.baseline).read_text())
        result["scaling_efficiency"] = samples_per_s / (world * one["samples_per_s"])
    if dist.is_main():
        print(f"{card}, {world} process(es), {cfg.model.generator}, {t.classes} classes x {t.gen_per_class} "
              f"generated (chunks of {chunk} per process)")
        print(f"step {1e3 * step_s:.1f} ms, {samples_per_s:.0f} samples/s, peak {peak_gib:.2f} GiB, "
              f"{total_flops / 1e12:.2f} TFLOP/step/process, MFU {100 * mfu:.1f}%"
              + (f", scaling efficiency {100 * result['scaling_efficiency']:.1f}%" if args.baseline else ""))
        synced = sum(split.values())
        print(f"{'phase':<28} {'ms':>9} {'share':>7}   (synchronised steps: {1e3 * synced:.1f} ms)")
        for k, v in split.items():
            print(f"{k:<28} {1e3 * v:>9.1f} {100 * v / synced:>6.1f}%")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    dist.cleanup()


def generator_inputs(model, n: int, device) -> tuple:
    """Inputs of n generated samples (random: the FLOPs do not depend on the values)."""
    noise, style = draw_inputs(model, n, generator=torch.Generator().manual_seed(1), device=device)
    return noise, torch.zeros(n, dtype=torch.long, device=device), torch.ones(n, device=device), style


if __name__ == "__main__":
    main()
