"""The flow-matching baseline: loss and interpolation at hand-checkable points, the Euler sampler against analytic
velocity fields, the velocity net is the generator, `drifting train-flow` end to end, bit-exact resume, the .npz of
`sample-flow` has `sample_to_npz`'s layout, and bad values are refused with the field's name."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from drifting.cli import main as cli
from drifting.config import load_config, resolve_preset
from drifting.models.dit import build_generator
from drifting.train.checkpoint import load_checkpoint
from drifting.train.flow import (
    TIME_SCALE, FlowConfig, FlowTrainConfig, VelocityNet, euler, flow_loss, flow_samples_to_npz, interpolate,
    load_velocity_net, main, sample_flow, sample_time,
)
from drifting.train.gen import DataConfig, GenConfig
from multiproc import free_port, spawn

# DiT-tiny on 4 classes of 8x8x3 synthetic squares, 8 images per step.
TINY = FlowConfig(data=DataConfig(synthetic_per_class=16),
                  train=FlowTrainConfig(steps=2, batch=8, warmup_steps=1, log_every=1, grid_steps=(1,)))
TINY_ARGS = ["train.steps=2", "train.batch=8", "train.warmup_steps=1", "train.log_every=1",
             "data.synthetic_per_class=16"]


def with_train(cfg: FlowConfig, **changes) -> FlowConfig:
    return replace(cfg, train=replace(cfg.train, **changes))


class Field(nn.Module):
    """An analytic velocity field with the generator interface (no parameters, no styles)."""

    def __init__(self, fn, shape=(2,), num_classes=1):
        super().__init__()
        self.fn, self.noise_shape, self.num_classes = fn, shape, num_classes
        self.style_tokens, self.style_codebook = 0, 1

    def forward(self, x, t, labels, style=None):
        return self.fn(x, t)


def test_interpolation_endpoints_and_the_loss_at_hand_checkable_points():
    g = torch.Generator().manual_seed(0)
    noise, data = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    assert torch.equal(interpolate(noise, data, torch.zeros(3)), noise)
    assert torch.equal(interpolate(noise, data, torch.ones(3)), data)
    t = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(interpolate(noise, data, t)[1], 0.75 * noise[1] + 0.25 * data[1])
    labels = torch.zeros(3, dtype=torch.long)
    oracle = Field(lambda x, t: data - noise)  # the exact target velocity
    assert flow_loss(oracle, data, noise, t, labels).item() == 0.0
    zero = Field(lambda x, t: torch.zeros_like(x))
    torch.testing.assert_close(flow_loss(zero, data, noise, t, labels), (data - noise).square().mean())


def test_time_sampling():
    g = torch.Generator().manual_seed(0)
    u, ln = sample_time(4000, "uniform", g), sample_time(4000, "logit-normal", g)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.mean() - 0.5) < 0.02 and ln.std() < u.std()
    with pytest.raises(ValueError, match="time_sampling"):
        sample_time(4, "beta")


def test_euler_lands_on_a_constant_target_with_its_exact_velocity():
    c = torch.tensor([[3.0, -2.0]])  # all data at one point: v(x, t) = (c - x) / (1 - t), linear paths
    field = Field(lambda x, t: (c - x) / (1 - t[:, None]))
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(euler(field, noise, labels, 1), c.expand(5, 2))  # one step: noise + (c - noise)
    torch.testing.assert_close(euler(field, noise, labels, 7), c.expand(5, 2))  # straight paths: Euler is exact


def test_euler_on_a_linear_field_matches_the_closed_form():
    lam = -0.7  # v = lam * x: Euler gives (1 + lam / N)^N x0, the ODE exp(lam) x0
    field = Field(lambda x, t: lam * x)
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    for n in (1, 3, 50):
        torch.testing.assert_close(euler(field, x0, labels, n), (1 + lam / n) ** n * x0)
    assert torch.allclose(euler(field, x0, labels, 50), math.exp(lam) * x0, atol=0.01)
    with pytest.raises(ValueError, match="steps"):
        euler(field, x0, labels, 0)


def tiny_velocity_net() -> VelocityNet:
    torch.manual_seed(0)
    net = VelocityNet(build_generator("DiT-tiny", num_classes=4))
    with torch.no_grad():  # a non-zero output layer (it starts at exactly zero)
        net.generator.final_linear.weight.normal_(std=0.1)
    return net


def test_the_velocity_net_is_the_generator():
    net = tiny_velocity_net()
    gen = net.generator
    assert [id(p) for p in net.parameters()] == [id(p) for p in gen.parameters()]
    assert [k.removeprefix("generator.") for k in net.state_dict()] == list(gen.state_dict())
    assert net.noise_shape == gen.noise_shape and net.num_classes == 4
    x, y = torch.randn(3, *gen.noise_shape), torch.tensor([0, 1, 3])
    style = torch.randint(0, gen.style_codebook, (3, gen.style_tokens))
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(net(x, t, y, style), gen(x, y, 1 + TIME_SCALE * t, style))
    assert TIME_SCALE == 3.0  # t in [0, 1] -> alpha in [1, 4], the drifting generator's alpha range


def test_seeded_sampling_is_reproducible():
    net = tiny_velocity_net()
    labels = torch.tensor([0, 1, 2, 3])
    a = sample_flow(net, labels, 3, generator=torch.Generator().manual_seed(5))
    b = sample_flow(net, labels, 3, generator=torch.Generator().manual_seed(5))
    c = sample_flow(net, labels, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, *net.noise_shape)
    with pytest.raises(ValueError, match="steps"):
        sample_flow(net, labels, 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`drifting train-flow` on the debug preset, 2 steps."""
    run = tmp_path_factory.mktemp("flow") / "run"
    assert cli(["train-flow", "--preset", "flow/debug", "--no-progress", "--out", str(run), *TINY_ARGS]) == 0
    return run


def test_train_flow_command_writes_everything(trained):
    for name in ("config.yaml", "metrics.jsonl", "ema.pt", "ema.json", "checkpoints/ckpt-000000002.pt",
                 "samples_000002_euler1.png", "samples_000002_euler50.png"):
        assert (trained / name).exists(), name
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 2
    export = torch.load(trained / "ema.pt", weights_only=True)
    assert export["meta"]["kind"] == "flow" and export["meta"]["time_scale"] == TIME_SCALE
    state = load_checkpoint(trained / "checkpoints")
    assert state["step"] == 2 and set(export["model"]) == set(state["model"])  # the plain generator's keys
    assert state["model"]["final_linear.weight"].abs().sum() > 0  # moved off the zero initialisation


def test_resume_continues_the_same_run_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(with_train(TINY, steps=4), straight, progress=False)
    main(with_train(TINY, steps=2), resumed, progress=False)
    main(with_train(TINY, steps=4), resumed, progress=False)  # picks up the step-2 checkpoint
    a, b = load_checkpoint(straight / "checkpoints"), load_checkpoint(resumed / "checkpoints")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        flat_a = a[part] if part == "model" else a[part]["0.999"]
        flat_b = b[part] if part == "model" else b[part]["0.999"]
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), (part, k)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), k


def _worker(rank: int, world: int, port: int, run_dir: str, cfg: FlowConfig) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(cfg, run_dir, progress=False)


def test_two_gloo_processes_give_the_same_run_as_one(tmp_path):
    cfg = with_train(TINY, steps=3)  # each process takes 4 of the 8 images of a step
    main(cfg, tmp_path / "single", progress=False)
    spawn(_worker, 2, free_port(), str(tmp_path / "two"), cfg)
    a, b = load_checkpoint(tmp_path / "single" / "checkpoints"), load_checkpoint(tmp_path / "two" / "checkpoints")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_flow_samples_have_the_layout_of_sample_to_npz(trained, tmp_path):
    from drifting.eval.sample import load_generator, sample_to_npz

    flow = flow_samples_to_npz(trained / "ema.pt", tmp_path / "flow.npz", num_per_class=3, steps=2, seed=0,
                               batch=5, device="cpu")
    # the network as a one-step generator gives the layout `drifting sample` writes
    ref = sample_to_npz(load_velocity_net(trained / "ema.pt").generator, tmp_path / "ref.npz", num_per_class=3, seed=0)
    with pytest.raises(ValueError, match="sample-flow"):  # `drifting sample` refuses a flow export
        load_generator(trained / "ema.pt")
    with np.load(flow) as f, np.load(ref) as r:
        assert sorted(f.files) == sorted(r.files)
        for k in r.files:
            assert f[k].dtype == r[k].dtype and f[k].shape == r[k].shape, k
        assert np.array_equal(f["labels"], r["labels"]) and f["images"].shape == (12, 3, 8, 8)
        flow_images = f["images"]
    assert flow.with_suffix(".png").exists()
    # the same samples from the command line (another batch size: the samples do not depend on it)
    out = tmp_path / "cli.npz"
    assert cli(["sample-flow", str(trained / "ema.pt"), "--steps", "2", "--num-per-class", "3", "--out", str(out),
                "--batch", "7", "--device", "cpu"]) == 0
    with np.load(out) as c:
        assert np.array_equal(c["images"], flow_images)
    # one step is noise + v(noise, 0), with the noise of `drifting sample`
    one = flow_samples_to_npz(trained / "ema.pt", tmp_path / "one.npz", num_per_class=1, steps=1, device="cpu",
                              grid=False)
    net = load_velocity_net(trained / "ema.pt")
    x = sample_flow(net, [0], 1, generator=torch.Generator().manual_seed(0))  # block 0 of seed 0
    from drifting.data.datasets import to_uint8

    with np.load(one) as o:
        assert np.array_equal(o["images"][:1], to_uint8(x).numpy())


def test_sample_flow_refuses_bad_steps_and_drifting_exports(trained, tmp_path, capsys):
    with pytest.raises(ValueError, match="steps"):
        flow_samples_to_npz(trained / "ema.pt", tmp_path / "x.npz", num_per_class=1, steps=0, seed=0, batch=4)
    assert cli(["sample-flow", str(trained / "ema.pt"), "--steps", "0", "--out", str(tmp_path / "x.npz")]) == 2
    assert "steps" in capsys.readouterr().err
    export = torch.load(trained / "ema.pt", weights_only=True)
    export["meta"].pop("kind")
    torch.save(export, tmp_path / "drift.pt")
    with pytest.raises(ValueError, match="kind"):
        load_velocity_net(tmp_path / "drift.pt")


@pytest.mark.parametrize("override, field", [
    ("train.steps=0", "train.steps"),
    ("train.batch=0", "train.batch"),
    ("train.time_sampling=beta", "train.time_sampling"),
    ("train.grid_steps=[1,0]", "train.grid_steps"),
    ("train.ema_decays=[1.5]", "train.ema_decays"),
    ("model.generator=DiT-huge", "model.generator"),
    ("data.dataset=nowhere", "data.dataset"),
])
def test_bad_configuration_names_the_field(tmp_path, capsys, override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(FlowConfig, None, [override])
    assert cli(["train-flow", "--no-progress", "--out", str(tmp_path), override]) == 2
    assert field in capsys.readouterr().err and not (tmp_path / "metrics.jsonl").exists()


def test_dataclass_checks_without_the_loader():
    with pytest.raises(ValueError, match="train.steps"):
        FlowConfig(train=FlowTrainConfig(steps=0))
    with pytest.raises(ValueError, match="train.time_sampling"):
        FlowConfig(train=FlowTrainConfig(time_sampling="beta"))


@pytest.mark.parametrize("name", ["debug", "mnist", "cifar10"])
def test_presets_match_the_drifting_presets(name):
    flow = load_config(FlowConfig, resolve_preset(f"flow/{name}"))
    gen = load_config(GenConfig, resolve_preset(f"gen/{name}"))
    assert flow.model == gen.model and flow.data == gen.data
    assert flow.train.batch == gen.train.classes * gen.train.gen_per_class
    assert (flow.train.lr, flow.train.warmup_steps, flow.train.steps) == (gen.train.lr, gen.train.warmup_steps,
                                                                         gen.train.steps)
    if name == "debug":
        assert flow == FlowConfig()  # the preset is the default


def test_time_limit_ends_as_the_last_step(tmp_path):
    main(replace(TINY, train=replace(TINY.train, steps=6, log_every=2, time_limit_min=1e-9)), tmp_path,
         progress=False)
    assert load_checkpoint(tmp_path / "checkpoints")["step"] == 2
    assert load_checkpoint(tmp_path / "ema.pt")["meta"]["step"] == 2
    with pytest.raises(ValueError, match="train.time_limit_min"):
        replace(TINY, train=replace(TINY.train, time_limit_min=-1.0))
