"""The generator trainer: it runs, class chunks and 2 processes give the same update as one step in one process,
resume continues the same run bit for bit, and bad configurations fail before any work."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from drifting.train.checkpoint import load_checkpoint
from drifting.train.gen import DataConfig, GenConfig, TrainConfig, main
from drifting.train.log import read_metrics
from multiproc import free_port, spawn

# 4 classes of 8x8x3 synthetic images, DiT-tiny, tiny batches.
TINY = GenConfig(
    data=DataConfig(synthetic_per_class=32),
    train=TrainConfig(steps=2, classes=4, gen_per_class=4, pos_per_class=4, uncond_per_class=2, log_every=1,
                      queue_per_class=16, queue_uncond=32, push_per_step=16),
)


def with_train(cfg: GenConfig, **changes) -> GenConfig:
    return replace(cfg, train=replace(cfg.train, **changes))


def final_state(run_dir) -> dict:
    return load_checkpoint(run_dir / "checkpoints")


def assert_same_model(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_default_run_trains_and_writes_everything(tmp_path):
    final = main(TINY, tmp_path, progress=False)
    assert {"loss", "grad_norm", "scale/global"} <= set(final)
    for name in ("config.yaml", "metrics.jsonl", "ema.pt", "ema.json", "samples_000002.png"):
        assert (tmp_path / name).exists(), name
    state = final_state(tmp_path)
    assert state["step"] == 2
    # the generator moved away from its zero-output initialisation (its last layer starts at exactly zero)
    last = [v for k, v in state["model"].items() if k.startswith("final")]
    assert last and any(v.abs().sum() > 0 for v in last)


def test_class_chunks_give_the_same_update_as_one_step(tmp_path):
    whole = tmp_path / "whole"
    chunked = tmp_path / "chunked"
    # 3 steps: after the first, AdamW's update depends on gradient magnitudes, not only on their signs
    main(with_train(TINY, steps=3), whole, progress=False)
    main(with_train(TINY, steps=3, class_chunk=1), chunked, progress=False)
    assert_same_model(final_state(whole)["model"], final_state(chunked)["model"], exact=False)
    kept = tmp_path / "kept"  # the statistics pass holding the chunks' features: the same run, bit for bit
    main(with_train(TINY, steps=3, class_chunk=1, stats_keep_features=True), kept, progress=False)
    assert_same_model(final_state(chunked)["model"], final_state(kept)["model"], exact=True)
    grouped = tmp_path / "grouped"  # the statistics math once per source: the same run to float rounding
    main(with_train(TINY, steps=3, class_chunk=1, stats_group_keys=True), grouped, progress=False)
    assert_same_model(final_state(chunked)["model"], final_state(grouped)["model"], exact=False)
    stacked = tmp_path / "stacked"  # the statistics calls once over every chunk: the same run to float rounding
    main(with_train(TINY, steps=3, class_chunk=1, stats_stack_below=10**6), stacked, progress=False)
    assert_same_model(final_state(chunked)["model"], final_state(stacked)["model"], exact=False)
    losses = tmp_path / "losses"  # and their losses in the statistics pass: the same run to float rounding
    main(with_train(TINY, steps=3, class_chunk=1, stats_stack_below=10**6, stats_stacked_losses=True), losses,
         progress=False)
    assert_same_model(final_state(chunked)["model"], final_state(losses)["model"], exact=False)


def test_loss_calls_with_a_sources_keys_stacked_give_the_same_run(tmp_path):
    """train.loss_group_keys with an encoder (its taps' keys are what get stacked): the same run to float rounding."""
    with_enc = replace(TINY, loss=replace(TINY.loss, encoder="mae_tiny", encoder_weights="random"))
    runs = {}
    for stacked in (False, True):
        runs[stacked] = tmp_path / str(stacked)
        main(with_train(with_enc, steps=2, class_chunk=2, loss_group_keys=stacked), runs[stacked], progress=False)
    assert_same_model(final_state(runs[False])["model"], final_state(runs[True])["model"], exact=False)


def test_resume_continues_the_same_run_bit_for_bit(tmp_path):
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    main(with_train(TINY, steps=4), straight, progress=False)
    main(with_train(TINY, steps=2), resumed, progress=False)
    main(with_train(TINY, steps=4), resumed, progress=False)  # picks up the step-2 checkpoint
    a, b = final_state(straight), final_state(resumed)
    assert a["step"] == b["step"] == 4
    assert_same_model(a["model"], b["model"], exact=True)
    assert_same_model(a["ema"]["0.999"], b["ema"]["0.999"], exact=True)


def _worker(rank: int, world: int, port: int, run_dir: str, cfg: GenConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(cfg, run_dir, progress=False)


def test_two_gloo_processes_give_the_same_update_as_one(tmp_path):
    cfg = with_train(TINY, steps=3)
    single = tmp_path / "single"
    main(cfg, single, progress=False)
    spawn(_worker, 2, free_port(), str(tmp_path / "two"), cfg)
    assert_same_model(final_state(single)["model"], final_state(tmp_path / "two")["model"], exact=False)
    # The logged loss is the step's loss (summed over the processes' shares), not rank 0's share.
    logged = [read_metrics(d / "metrics.jsonl")[-1] for d in (single, tmp_path / "two")]
    assert logged[0]["step"] == logged[1]["step"] == 3
    assert logged[1]["loss"] == pytest.approx(logged[0]["loss"], rel=1e-5)


def test_fsdp_processes_give_the_same_run_as_one_and_resume(tmp_path):
    # FSDP2 shards the generator, its EMA and the AdamW state over 2 processes, with class chunks accumulated
    # without gradient sync; 2 steps, then a resumed run to step 4, equal 4 steps in one process.
    single, two = tmp_path / "single", tmp_path / "two"
    main(with_train(TINY, steps=4), single, progress=False)
    cfg = with_train(TINY, strategy="fsdp", class_chunk=1)
    spawn(_worker, 2, free_port(), str(two), with_train(cfg, steps=2))
    spawn(_worker, 2, free_port(), str(two), with_train(cfg, steps=4))
    a, b = final_state(single), final_state(two)
    assert b["step"] == 4
    assert_same_model(a["model"], b["model"], exact=False)
    assert_same_model(a["ema"]["0.999"], b["ema"]["0.999"], exact=False)
    # the optimiser state is gathered into the same layout whatever the strategy
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, moments in a["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[key], b["optimizer"]["state"][name][key], rtol=1e-4, atol=1e-9)
    assert (two / "ema.pt").exists() and (two / "samples_000004.png").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(classes=5), "train.classes"),  # more classes per step than the data has
        (dict(class_chunk=3), "train.class_chunk"),  # 3 does not divide 4
        (dict(class_chunk=2, loss_cuda_graph=True), "train.loss_cuda_graph: needs a CUDA device"),
        (dict(class_chunk=2, stats_cuda_graph=True), "train.stats_cuda_graph: needs a CUDA device"),
    ],
)
def test_bad_configuration_fails_at_start(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        main(with_train(TINY, **change), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="model.generator"):
        GenConfig(model=replace(TINY.model, generator="DiT-huge"))
    with pytest.raises(ValueError, match="data.dataset"):
        GenConfig(data=DataConfig(dataset="imagenet-21k"))
    with pytest.raises(ValueError, match="train.strategy"):
        with_train(TINY, strategy="deepspeed")
    with pytest.raises(ValueError, match="train.stats_fused_min_problems"):
        with_train(TINY, stats_fused_min_problems=0)
    with pytest.raises(ValueError, match="train.stats_stack_below"):
        with_train(TINY, stats_stack_below=0)
    with pytest.raises(ValueError, match="train.stats_stacked_losses"):
        with_train(TINY, stats_stacked_losses=True)  # without stats_stack_below
    with pytest.raises(ValueError, match="train.loss_cuda_graph"):
        with_train(TINY, loss_cuda_graph=True)  # without class_chunk
    with pytest.raises(ValueError, match="train.stats_cuda_graph"):
        with_train(TINY, stats_cuda_graph=True)  # without class_chunk
    with pytest.raises(FileNotFoundError):
        main(replace(TINY, data=DataConfig(dataset="mnist", path="/nonexistent/mnist.npz")), "/tmp/unused-run")


def test_every_preset_loads_and_paper_presets_need_their_data():
    from pathlib import Path

    from drifting.config import load_config

    presets = sorted(Path(__file__).resolve().parents[1].glob("configs/gen/*.yaml"))
    assert {p.stem for p in presets} >= {"debug", "mnist", "fashion", "cifar10", "ablation", "latent_b2", "latent_l2",
                                         "pixel_b16", "pixel_l16"}
    for path in presets:
        cfg = load_config(GenConfig, path, ["data.path=/data/somewhere"])
        assert cfg.train.steps >= 1
    ablation = load_config(GenConfig, presets[[p.stem for p in presets].index("ablation")], ["data.path=/x"])
    t = ablation.train  # Table 8, ablation column
    assert (t.classes, t.gen_per_class, t.pos_per_class, t.uncond_per_class, t.lr, t.warmup_steps, t.steps) == (
        64, 64, 64, 16, 2e-4, 5000, 30000)
    with pytest.raises(ValueError, match="data.path"):
        load_config(GenConfig, presets[[p.stem for p in presets].index("ablation")])
    for name, generator, lr in (("pixel_b16", "DiT-B/16", 2e-4), ("pixel_l16", "DiT-L/16", 4e-4)):  # Table 8, pixel
        cfg = load_config(GenConfig, presets[[p.stem for p in presets].index(name)], ["data.path=/x"])
        t = cfg.train
        assert (cfg.data.dataset, cfg.data.image_size, cfg.data.augment) == ("image-folder", 256, "rrc")
        assert (cfg.model.generator, cfg.loss.encoder, t.lr, t.steps) == (generator, "mae_pixel_640", lr, 100000)
        assert (t.classes, t.gen_per_class, t.pos_per_class, t.uncond_per_class) == (128, 64, 128, 32)
        with pytest.raises(ValueError, match="data.path"):
            load_config(GenConfig, presets[[p.stem for p in presets].index(name)])


def test_trainer_streams_an_image_folder(tmp_path):
    """data.dataset=image-folder: images decoded on demand (threads), cropped to data.image_size; exact resume."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (12 + i, 10 + 2 * c, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    data = DataConfig(dataset="image-folder", path=str(tmp_path / "imgs"), image_size=8, workers=2)
    cfg = replace(with_train(TINY, classes=3, queue_per_class=4, queue_uncond=8, push_per_step=6), data=data)
    main(with_train(cfg, steps=3), tmp_path / "straight", progress=False)
    main(with_train(cfg, steps=2), tmp_path / "resumed", progress=False)
    main(with_train(cfg, steps=3), tmp_path / "resumed", progress=False)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a["queue"]["classes"].dtype == torch.uint8 and a["queue"]["classes"].shape[-3:] == (3, 8, 8)
    assert_same_model(a["model"], b["model"], exact=True)
    with pytest.raises(ValueError, match="data.path"):
        GenConfig(data=DataConfig(dataset="image-folder"))
    with pytest.raises(ValueError, match="data.augment"):
        GenConfig(data=replace(data, augment="jitter"))


def test_an_encoder_without_weights_is_refused(tmp_path):
    cfg = replace(TINY, loss=replace(TINY.loss, encoder="mae_tiny"))
    with pytest.raises(ValueError, match="encoder_weights"):
        main(cfg, tmp_path, progress=False)


def test_time_limit_ends_as_the_last_step_and_resume_continues_the_same_run(tmp_path):
    # 1e-9 minutes have passed at the first check (step 2, the first log step): the run ends there with a checkpoint
    # and an EMA export; a resume without the limit then finishes the 6 steps exactly as an uninterrupted run.
    limited, straight = tmp_path / "limited", tmp_path / "straight"
    main(with_train(TINY, steps=6, log_every=2, time_limit_min=1e-9), limited, progress=False)
    assert final_state(limited)["step"] == 2
    assert load_checkpoint(limited / "ema.pt")["meta"]["step"] == 2
    main(with_train(TINY, steps=6, log_every=2), limited, progress=False)
    main(with_train(TINY, steps=6, log_every=2), straight, progress=False)
    a, b = final_state(limited), final_state(straight)
    assert a["step"] == b["step"] == 6
    assert_same_model(a["model"], b["model"], exact=True)


def test_time_limit_is_checked_only_at_its_steps_and_never_when_zero():
    from drifting.train.dist import TimeLimit

    assert not TimeLimit(0.0, every=1).reached(1)  # 0: no limit
    spent = TimeLimit(1e-9, every=5)
    assert not spent.reached(4) and spent.reached(5)
    assert not TimeLimit(60.0, every=1).reached(1)  # an hour has not passed
    with pytest.raises(ValueError, match="train.time_limit_min"):
        with_train(TINY, time_limit_min=-1.0)


def test_encoder_start_step_trains_on_the_raw_key_first_then_adds_the_encoder(tmp_path):
    with_enc = replace(TINY, loss=replace(TINY.loss, encoder="mae_tiny", encoder_weights="random",
                                          encoder_start_step=2))
    main(with_train(with_enc, steps=3), tmp_path / "delayed", progress=False)
    main(with_train(TINY, steps=2), tmp_path / "raw", progress=False)
    rows = read_metrics(tmp_path / "delayed" / "metrics.jsonl")
    keys = [{k.split("/", 1)[1] for k in r if k.startswith("scale/")} for r in rows if "loss" in r]
    assert keys[0] == keys[1] == {"global"} and len(keys[2]) > 1  # steps 1-2 raw only, step 3 with the encoder
    # up to the switch the run is exactly a raw-pixel run
    main(with_train(with_enc, steps=2), tmp_path / "delayed2", progress=False)
    assert_same_model(final_state(tmp_path / "delayed2")["model"], final_state(tmp_path / "raw")["model"], exact=True)
    with pytest.raises(ValueError, match="loss.encoder_start_step"):
        replace(TINY, loss=replace(TINY.loss, encoder_start_step=5))
    with pytest.raises(ValueError, match="loss.encoder_start_step"):
        replace(TINY, loss=replace(TINY.loss, encoder="mae_tiny", encoder_start_step=-1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("encoder", [None, "mae_tiny"])
@pytest.mark.parametrize("options", [{}, dict(stats_fused_min_problems=1, stats_stack_below=10**6,
                                              stats_stacked_losses=True, loss_group_keys=True)])
def test_training_steps_never_wait_for_the_gpu(tmp_path, options, encoder):
    """Host syncs come with a run's start, its logging, samples and checkpoint, not with each step: after a warm-up
    run, 6 steps of class chunks make as many syncs as 3 (each run logs, samples and saves once, at its end); also
    with the statistics on the kernel, stacked over the chunks, with their losses, and with an encoder's keys (the
    fused statistics keys, grouped or not)."""
    import warnings

    base = TINY if encoder is None else replace(TINY, loss=replace(TINY.loss, encoder=encoder, encoder_weights="random"))

    def syncs(steps: int) -> int:
        cfg = with_train(base, steps=steps, class_chunk=2, log_every=steps, **options)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                main(cfg, tmp_path / str(steps), progress=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(2)  # compiles kernels and fills caches
    three, six = syncs(3), syncs(6)
    assert three > 0  # the final log reads the loss back: the warnings are seen
    assert six == three
