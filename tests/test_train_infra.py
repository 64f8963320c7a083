"""Training infrastructure: LR schedule, EMA, checkpoints and RNG state, distribution helpers, wrapping, logging."""

from __future__ import annotations

import importlib
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from drifting.train import dist as tdist
from drifting.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_path,
    export_weights,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from drifting.train.ema import decay_from_half_life, ema_copy, ema_update, half_life_from_decay
from drifting.train.log import RunLogger, Throughput, make_run_dir, read_metrics
from drifting.train.parallel import full_state_dict, load_full_state_dict, unwrap, wrap_model
from drifting.train.schedule import lr_at
from multiproc import spawn


class Tiny(nn.Module):
    """Linear in, a `blocks` list (the FSDP units), a BatchNorm for buffers, linear out."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.inp = nn.Linear(3, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.norm = nn.BatchNorm1d(dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(self.norm(x))


# --------------------------------------------------------------------------- schedule


def test_lr_warmup_then_constant_like_the_authors():
    kw = dict(peak=2e-4, warmup_steps=100)
    assert lr_at(0, **kw) == 1e-6
    assert lr_at(50, **kw) == pytest.approx(1e-6 + (2e-4 - 1e-6) / 2, rel=1e-12)
    assert lr_at(99, **kw) < 2e-4
    assert lr_at(100, **kw) == 2e-4
    assert lr_at(10**6, **kw) == 2e-4
    assert lr_at(0, peak=2e-4, warmup_steps=0) == 2e-4  # no warmup: the peak from the first update
    # The ramp is monotone.
    values = [lr_at(s, **kw) for s in range(101)]
    assert all(a < b for a, b in zip(values, values[1:]))


def test_lr_cosine():
    kw = dict(peak=1.0, warmup_steps=10, kind="cosine", total_steps=110, final=0.1, start=0.0)
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway down: the mean of peak and final
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_lr_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        lr_at(0, peak=1.0, warmup_steps=1, kind="linear")
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, peak=1.0, warmup_steps=1, kind="cosine")
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, peak=1.0, warmup_steps=1)


# --------------------------------------------------------------------------- EMA


def _trained_pair():
    torch.manual_seed(0)
    model = Tiny()
    ema = ema_copy(model)
    with torch.no_grad():  # make the model differ from the EMA in parameters and buffers
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # updates the BatchNorm running statistics and counter
    return model, ema


def test_ema_copy_is_fp32_eval_without_grad():
    model = Tiny().to(torch.float64)
    ema = ema_copy(model)
    assert not ema.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.parameters())


def test_ema_decay_zero_copies_and_decay_one_keeps_parameters_but_copies_buffers():
    model, ema = _trained_pair()
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 1.0)
    for name, p in ema.named_parameters():
        assert torch.equal(p, before[name])
    for name, b in ema.named_buffers():
        assert torch.equal(b, model.get_buffer(name)), name
    assert int(ema.norm.num_batches_tracked) == 1
    ema_update(ema, model, 0.0)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_ema_lerp_value_and_several_decays():
    model, ema = _trained_pair()
    emas = {0.9: ema, 0.5: ema_copy(ema), "frozen": ema_copy(ema)}
    start = {k: e.inp.weight.clone() for k, e in emas.items()}
    ema_update(emas, model, {0.9: 0.9, 0.5: 0.5, "frozen": 1.0})
    w = model.inp.weight.detach()
    torch.testing.assert_close(emas[0.9].inp.weight, 0.9 * start[0.9] + 0.1 * w)
    torch.testing.assert_close(emas[0.5].inp.weight, 0.5 * start[0.5] + 0.5 * w)
    assert torch.equal(emas["frozen"].inp.weight, start["frozen"])
    ema_update(emas, model, 0.0)  # one float for every EMA
    assert all(torch.equal(e.inp.weight, w) for e in emas.values())
    with pytest.raises(KeyError):
        ema_update(emas, model, {0.9: 0.9})
    with pytest.raises(ValueError, match="names"):
        ema_update(nn.Linear(3, 4), model, 0.5)


def test_ema_half_life():
    assert decay_from_half_life(256, 256) == pytest.approx(0.5)
    assert decay_from_half_life(10_000, 100) ** 100 == pytest.approx(0.5)
    assert half_life_from_decay(decay_from_half_life(5000, 64), 64) == pytest.approx(5000)
    # Ramp-up: early on the half-life is capped by seen * ramp_up; nothing seen yet means a plain copy.
    assert decay_from_half_life(10_000, 100, seen=0, ramp_up=0.05) == 0.0
    assert decay_from_half_life(10_000, 100, seen=2000, ramp_up=0.05) == pytest.approx(0.5)
    assert half_life_from_decay(0.999, 1) == pytest.approx(692.8, rel=1e-3)


# --------------------------------------------------------------------------- checkpoints


def _state(step: int) -> dict:
    torch.manual_seed(step)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "config": {"lr": 1e-3, "name": "x"},
            "rng": capture_rng_state()}


def test_checkpoint_round_trip_and_latest(tmp_path):
    state = _state(3)
    path = save_checkpoint(checkpoint_path(tmp_path, 3), state)
    assert path.name == "ckpt-000000003.pt"
    loaded = load_checkpoint(tmp_path)  # a directory: its latest checkpoint
    assert loaded["step"] == 3 and loaded["config"] == {"lr": 1e-3, "name": "x"}
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    model = Tiny()
    model.load_state_dict(loaded["model"])
    torch.optim.AdamW(model.parameters()).load_state_dict(loaded["opt"])
    torch.load(path, weights_only=True)  # plain content: readable without trusting the file


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    loaded = load_checkpoint(path)  # the previous checkpoint is intact
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # and no temporary file is left behind


def test_checkpoint_rotation_keeps_last_k_and_every_n(tmp_path):
    for step in range(1, 8):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step}, keep_last=2, keep_every=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_path(tmp_path, s).name for s in (3, 6, 7)]
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 7)
    (tmp_path / "notes.txt").write_text("not a checkpoint")  # other files are never touched
    save_checkpoint(checkpoint_path(tmp_path, 8), {"step": 8}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000008.pt", "notes.txt"]


def test_checkpoint_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_checkpoint(tmp_path)  # a directory without checkpoints
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a zip archive")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    good = save_checkpoint(checkpoint_path(tmp_path, 1), _state(1))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk outside our atomic write
    with pytest.raises(CheckpointError, match=good.name):
        load_checkpoint(tmp_path)


def test_checkpoint_refuses_pickled_objects_before_writing(tmp_path):
    path = tmp_path / "x.pt"
    with pytest.raises(TypeError, match=r"state\['extra'\]\['arr'\].*numpy"):
        save_checkpoint(path, {"extra": {"arr": np.zeros(3)}})
    with pytest.raises(TypeError, match="Linear"):
        save_checkpoint(path, {"model": nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="float64"):
        save_checkpoint(path, {"loss": np.float64(1.0)})  # a float subclass that would still need pickle
    assert not any(tmp_path.iterdir())


def test_rng_capture_restore_reproduces_the_next_numbers(tmp_path):
    gen = torch.Generator().manual_seed(123)
    random.random(), np.random.rand(), torch.rand(1), torch.randn(1, generator=gen)  # move off the seeds
    state = capture_rng_state({"noise": gen})

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(4).tolist(), torch.randn(4, generator=gen).tolist())

    first = draw()
    # Through a checkpoint file, so the state is also weights_only-compatible.
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    restored = load_checkpoint(tmp_path / "rng.pt")["rng"]
    draw()  # advance everything again
    restore_rng_state(restored, {"noise": gen})
    assert draw() == first
    with pytest.raises(KeyError, match="noise"):
        restore_rng_state(restored)


def test_export_weights(tmp_path):
    model = Tiny()
    path = export_weights(tmp_path / "ema" / "ema_0.999.pt", model.state_dict(), {"depth": 2, "hidden": [4, 4]},
                          meta={"step": 10, "ema_decay": 0.999})
    loaded = torch.load(path, weights_only=True)
    assert loaded["config"] == {"depth": 2, "hidden": [4, 4]} and loaded["meta"]["step"] == 10
    Tiny().load_state_dict(loaded["model"])
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == {"config": {"depth": 2, "hidden": [4, 4]}, "meta": {"step": 10, "ema_decay": 0.999}}


# --------------------------------------------------------------------------- distribution, single process


def test_dist_single_process(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    device = tdist.init_distributed()
    assert device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert not dist.is_initialized()
    assert (tdist.rank(), tdist.world_size(), tdist.local_rank(), tdist.is_main()) == (0, 1, 0, True)
    assert tdist.rank_seed(7) == 7
    tdist.barrier()
    t = torch.tensor([1.0, 2.0])
    out = tdist.all_reduce_sum_tensor(t)
    assert torch.equal(out, t) and out is not t
    tdist.print0("hello", 3)
    assert capsys.readouterr().out == "hello 3\n"
    tdist.cleanup()


def test_wrap_model_single_process_returns_the_model():
    model = Tiny()
    for strategy in ("none", "ddp", "fsdp"):
        assert wrap_model(model, strategy=strategy, device="cpu") is model
    with pytest.raises(ValueError, match="strategy"):
        wrap_model(model, strategy="zero3", device="cpu")
    assert unwrap(model) is model
    sd = full_state_dict(model)
    load_full_state_dict(Tiny(), sd)


# --------------------------------------------------------------------------- logging


def test_logger_writes_json_lines(tmp_path, capsys):
    with RunLogger(tmp_path / "run", use_tensorboard=False) as logger:
        logger.log(0, {"loss": torch.tensor(0.5), "lr": 1e-6, "note": "warmup"})
        logger.log(10, {"loss": np.float32(0.25), "bad": float("nan")}, echo=True)
    assert "step 10 | loss 0.25" in capsys.readouterr().out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON per line
    assert [r["step"] for r in records] == [0, 10]
    assert records[0]["loss"] == 0.5 and records[0]["note"] == "warmup" and records[1]["bad"] is None
    assert all(isinstance(r["time"], float) and r["elapsed"] >= 0 for r in records)
    # A torn last line (crash mid-write) is skipped by read_metrics.
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "lo')
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 10]
    try:
        importlib.import_module("torch.utils.tensorboard")
        has_tb = True
    except Exception:  # noqa: BLE001
        has_tb = False
    with RunLogger(tmp_path / "tb") as default:  # TensorBoard when it imports, silently nothing otherwise
        assert default.tensorboard == has_tb
        default.log(0, {"loss": 1.0})
    quiet = RunLogger(tmp_path / "other", enabled=False)
    assert quiet.log(0, {"loss": 1.0}) == {} and not (tmp_path / "other").exists()
    with pytest.raises(TypeError):
        RunLogger(tmp_path / "run", use_tensorboard=False).log(1, {"x": [1, 2]})


def test_make_run_dir_numbers_runs(tmp_path):
    a = make_run_dir(tmp_path, "dit")
    b = make_run_dir(tmp_path, "dit")
    (tmp_path / "dit" / "notes").mkdir()
    (tmp_path / "dit" / "007").mkdir()
    c = make_run_dir(tmp_path, "dit")
    assert [p.relative_to(tmp_path).as_posix() for p in (a, b, c)] == ["dit/000", "dit/001", "dit/008"]
    assert make_run_dir(tmp_path, "mae").name == "000"


def test_throughput_is_windowed_and_smoothed():
    now = [0.0]
    meter = Throughput(smoothing=0.5, clock=lambda: now[0])
    assert meter.rate() == 0.0
    meter.update(100)
    now[0] = 1.0
    assert meter.rate() == 100.0
    meter.update(300)
    now[0] = 2.0
    assert meter.rate() == 200.0  # 0.5 * 100 + 0.5 * 300
    assert meter.total == 400


# --------------------------------------------------------------------------- two gloo processes


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(6, 3, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).pow(2).mean().backward()
    return {n: p.grad for n, p in unwrap(model).named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # What torchrun would set; the file:// rendezvous avoids picking a free port.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    device = tdist.init_distributed(init_method=f"file://{init_file}")
    try:
        out = {"rank": tdist.rank(), "world": tdist.world_size(), "device": str(device),
               "sum": tdist.all_reduce_sum_tensor(torch.tensor([rank + 1.0]))}
        torch.manual_seed(0)
        model = wrap_model(Tiny().double(), strategy="ddp", device=device)
        out["ddp_type"] = type(model).__name__
        out["ddp_broadcasts_buffers"] = model.broadcast_buffers  # constant buffers: no collective per forward
        out["ddp"] = {n: g.clone() for n, g in _grads(model, _batch(rank)).items()}
        ema = ema_copy(model)  # looks through the DDP wrapper
        ema_update(ema, model, 0.0)
        out["ddp_ema_equal"] = all(torch.equal(e, p.float()) for e, p in zip(ema.parameters(), model.parameters()))
        torch.manual_seed(0)
        plain = Tiny().double()
        sharded_ema = wrap_model(ema_copy(plain).double(), strategy="fsdp", device=device)  # copy, then shard alike
        sharded = wrap_model(plain, strategy="fsdp", device=device)
        grads = _grads(sharded, _batch(rank))
        out["fsdp"] = {n: g.full_tensor() for n, g in grads.items()}  # gather the gradient shards
        out["fsdp_state"] = full_state_dict(sharded)  # rank 0 only
        with torch.no_grad():
            for p in sharded.parameters():
                p.mul_(2)
        ema_update(sharded_ema, sharded, 0.5)  # shard by shard, on DTensors
        out["fsdp_ema_state"] = full_state_dict(sharded_ema)
        tdist.barrier()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        tdist.cleanup()


def test_two_gloo_processes_average_gradients(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    spawn(_worker, 2, str(tmp_path / "init"), str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = Tiny().double()
    per_rank = [{n: g.clone() for n, g in _grads(model, _batch(r)).items()} for r in range(2)]
    for r, part in enumerate(parts):
        assert (part["rank"], part["world"], part["device"]) == (r, 2, "cpu")
        assert part["sum"].item() == 3.0
        assert part["ddp_type"] == "DistributedDataParallel" and part["ddp_broadcasts_buffers"] is False
        for name, g0 in per_rank[0].items():
            expected = (g0 + per_rank[1][name]) / 2
            torch.testing.assert_close(part["ddp"][name], expected, rtol=1e-12, atol=1e-15)
            # FSDP2 on the same per-rank batches gives the same averaged gradient (BatchNorm sees local batches).
            torch.testing.assert_close(part["fsdp"][name], expected, rtol=1e-12, atol=1e-15)
    # Not vacuous: the two ranks' own gradients differ.
    assert not torch.allclose(per_rank[0]["inp.weight"], per_rank[1]["inp.weight"])
    assert set(parts[0]["fsdp_state"]) == set(model.state_dict()) and parts[1]["fsdp_state"] == {}
    for name, p in model.named_parameters():  # no optimiser step was taken: still the initial weights
        torch.testing.assert_close(parts[0]["fsdp_state"][name], p.detach())
        torch.testing.assert_close(parts[0]["fsdp_ema_state"][name], 1.5 * p.detach())  # 0.5 * p + 0.5 * 2p
    assert parts[0]["ddp_ema_equal"] and parts[1]["ddp_ema_equal"]
