"""Drifting Policy on Push-T: environment parity, demonstration loader, policy shapes, smoke training/evaluation.

Skips cleanly without the `policy` extra (gym-pusht, pymunk, zarr...). CPU only, a few seconds in all.
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("zarr")
pytest.importorskip("pymunk")
pytest.importorskip("shapely")
pytest.importorskip("pygame")
pytest.importorskip("gym_pusht")

from drifting.config import load_config, resolve_preset  # noqa: E402
from drifting.policy.demos import (  # noqa: E402
    DemoConfig, PushTDemos, export_npz, read_demos, read_zarr, split_episodes, synthetic_zarr, window_index,
)
from drifting.policy.env import PushT, dp_reset_state  # noqa: E402
from drifting.policy.evaluate import chunk_latency, cli as eval_cli, evaluate, score_spread  # noqa: E402
from drifting.policy.model import ChunkPolicy, ChunkUNet, PolicyModelConfig  # noqa: E402
from drifting.policy.train import PolicyConfig, PolicyTrainConfig, knn_index, load_policy, main  # noqa: E402
from drifting.train.checkpoint import load_checkpoint  # noqa: E402

TINY = PolicyModelConfig(down_dims=(16, 32), groups=4, time_dim=16)


# ---------------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 100000, 100049])
def test_reset_parity_with_diffusion_policy_draws(seed):
    rs = np.random.RandomState(seed)  # the documented order of draws
    expected = [rs.randint(50, 450), rs.randint(50, 450), rs.randint(100, 400), rs.randint(100, 400),
                rs.randn() * 2 * np.pi - np.pi]
    np.testing.assert_array_equal(dp_reset_state(seed), expected)
    obs = PushT().reset(seed=seed)
    np.testing.assert_allclose(obs[:4], expected[:4], atol=1e-6)
    assert abs(np.angle(np.exp(1j * (obs[4] - expected[4])))) < 1e-6  # angle reported mod 2 pi


def test_restore_state_sets_angle_before_position_and_steps_reproducibly():
    state = np.array([100.0, 120.0, 300.0, 250.0, 1.3])
    env = PushT()
    obs = env.reset(state=state)
    # the block's origin lands exactly where asked even though its centre of gravity is elsewhere
    np.testing.assert_allclose(obs, state, atol=1e-6)
    actions = [np.array([110.0 + 5 * k, 130.0 + 3 * k]) for k in range(12)]
    first = [env.step(a)[0] for a in actions]
    env.reset(state=state)
    second = [env.step(a)[0] for a in actions]
    np.testing.assert_allclose(np.stack(first), np.stack(second), atol=1e-9)
    assert np.abs(first[-1][:2] - obs[:2]).max() > 1.0  # the agent did move


def test_episode_ends_at_max_steps_with_clipped_reward():
    env = PushT(max_steps=5)
    env.reset(seed=100000)
    for k in range(5):
        _, reward, done, info = env.step(np.array([256.0, 256.0]))
        assert 0.0 <= reward <= 1.0 and reward == pytest.approx(min(info["coverage"] / 0.95, 1.0))
    assert done and info["steps"] == 5
    with pytest.raises(RuntimeError):
        env.step(np.array([256.0, 256.0]))


# ---------------------------------------------------------------------------------------------------------------------
# Demonstrations
# ---------------------------------------------------------------------------------------------------------------------


def test_split_sizes():
    train, val = split_episodes(206, 0.02, 90, 42)
    assert (len(train), len(val)) == (90, 4) and not set(train) & set(val)
    train, val = split_episodes(10, 0.02, 90, 42)
    assert (len(train), len(val)) == (9, 1)
    np.testing.assert_array_equal(split_episodes(206)[0], split_episodes(206)[0])  # seeded


def test_windows_pad_at_episode_borders():
    idx = window_index(np.array([20]), np.array([0]), obs_horizon=2, pred_horizon=16, action_horizon=8)
    assert idx.shape == (20 - 16 + 7 + 1 + 1, 16)  # starts -1 .. L - H + T_a - 1
    np.testing.assert_array_equal(idx[0, :3], [0, 0, 1])  # the first step repeated before the start
    np.testing.assert_array_equal(idx[-1, -3:], [19, 19, 19])  # the last step repeated after the end


def test_loader_on_tiny_zarr(tmp_path):
    path = synthetic_zarr(tmp_path / "tiny.zarr", episode_lengths=(30, 25, 40, 20))
    cfg = DemoConfig(path=str(path), val_ratio=0.25, max_train_episodes=2)
    train, val = PushTDemos(cfg, "train"), PushTDemos(cfg, "val")
    assert len(train.episodes) == 2 and len(val.episodes) == 1
    assert train.obs.shape[1:] == (2, 5) and train.action.shape[1:] == (16, 2)
    data = read_zarr(path)
    ends = data["episode_ends"]
    assert len(train) == sum(ends[e] - (ends[e - 1] if e else 0) - 16 + 8 + 1 for e in train.episodes)
    obs_norm, act_norm = train.fit_normalizers()
    y = act_norm.normalize(train.action)
    assert y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5
    torch.testing.assert_close(act_norm.unnormalize(y), train.action)


def test_npz_export_gives_the_same_windows(tmp_path):
    path = synthetic_zarr(tmp_path / "tiny.zarr", episode_lengths=(30, 25, 40, 20))
    npz = export_npz(path, tmp_path / "tiny.npz")
    for key, value in read_zarr(path).items():
        np.testing.assert_array_equal(read_demos(npz)[key], value)
    a = PushTDemos(DemoConfig(path=str(path), val_ratio=0.25, max_train_episodes=2))
    b = PushTDemos(DemoConfig(path=str(npz), val_ratio=0.25, max_train_episodes=2))
    torch.testing.assert_close(a.obs, b.obs, rtol=0, atol=0)
    torch.testing.assert_close(a.action, b.action, rtol=0, atol=0)


def test_npz_errors_name_the_path_and_the_arrays(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        read_demos(tmp_path / "nothere.npz")
    np.savez(tmp_path / "bad.npz", state=np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"missing arrays \['action', 'episode_ends'\]"):
        read_demos(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["drift", "ddpm"])
def test_policy_shapes_and_normaliser_in_state_dict(kind):
    policy = ChunkPolicy(kind, model=TINY, ddpm_steps=4)
    obs = torch.rand(3, 2, 5) * 400
    assert policy.sample_chunk(obs).shape == (3, 16, 2)
    assert policy.predict_action(obs).shape == (3, 8, 2)
    assert {"obs_norm.low", "obs_norm.high", "action_norm.low", "action_norm.high"} <= set(policy.state_dict())


def test_unet_gradients_reach_every_parameter():
    net = ChunkUNet(2, 10, TINY, timestep=True)
    out = net(torch.randn(4, 16, 2), torch.randn(4, 10), torch.randint(100, (4,)))
    assert out.shape == (4, 16, 2)
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_knn_positives_include_self():
    obs = torch.randn(50, 10)
    nn_idx = knn_index(obs, 4, chunk=16)
    assert nn_idx.shape == (50, 4)
    np.testing.assert_array_equal(nn_idx[:, 0].numpy(), np.arange(50))


def test_knn_positives_one_window_per_episode_equal_a_plain_search():
    """`knn_episodes`: the nearest window of each of the k nearest episodes, against a loop over windows."""
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(60, 10, generator=g)
    episode = torch.repeat_interleave(torch.arange(7), torch.tensor([5, 12, 1, 9, 15, 8, 10]))
    nn_idx = knn_index(obs, 4, chunk=16, episode=episode)
    assert nn_idx.shape == (60, 4)
    for i in range(60):
        d = (obs - obs[i]).norm(dim=1)
        nearest = {}  # episode -> its window nearest to window i
        for e in episode.unique().tolist():
            members = torch.nonzero(episode == e).flatten()
            nearest[e] = int(members[d[members].argmin()])
        expected = sorted(nearest.values(), key=lambda j: float(d[j]))[:4]
        assert nn_idx[i].tolist() == expected
        assert nn_idx[i, 0] == i and len(set(episode[nn_idx[i]].tolist())) == 4
    assert knn_index(obs, 10, episode=episode).shape == (60, 7)  # k capped at the number of episodes
    with pytest.raises(ValueError, match="episode: expected 60 non-decreasing ids"):
        knn_index(obs, 4, episode=episode.flip(0))


def train_tiny(tmp_path, run: str, **train_changes) -> dict:
    """A few steps of the tiny U-Net on a synthetic zarr into tmp_path / run; the last metrics."""
    path = tmp_path / "tiny.zarr"
    if not path.exists():
        synthetic_zarr(path)
    train = PolicyTrainConfig(**{**dict(k_pos=4, gen_per_obs=4, batch=8, steps=2, log_every=1, warmup_steps=1,
                                        ddpm_steps=5, device="cpu"), **train_changes})
    return main(PolicyConfig(data=DemoConfig(path=str(path)), model=TINY, train=train), tmp_path / run)


@pytest.mark.parametrize("method,positives", [("drift", "knn"), ("drift", "knn_episodes"), ("drift", "single"),
                                              ("ddpm", "knn")])
def test_smoke_training_and_evaluation(tmp_path, method, positives):
    last = train_tiny(tmp_path, "run", method=method, positives=positives, steps=3)
    assert np.isfinite(last["loss"])
    policy = load_policy(tmp_path / "run" / "policy.pt")
    assert policy.kind == method and float(policy.action_norm.high.max()) > 1.0  # raw pixel units restored
    result = evaluate(policy, n_episodes=1, max_steps=10)
    assert result["steps"] == [10] and 0.0 <= result["score"] <= 1.0
    assert chunk_latency(policy, repeats=2, warmup=1)["median_ms"] > 0


@pytest.mark.parametrize("method", ["drift", "ddpm"])
def test_bf16_runs_the_network_in_bf16_and_the_loss_in_fp32(tmp_path, method):
    runs = {}
    for bf16 in (False, True):
        dtypes = []
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: dtypes.append(o.dtype) if isinstance(m, torch.nn.Conv1d) else None)
        try:
            last = train_tiny(tmp_path, str(bf16), method=method, bf16=bf16)
        finally:
            hook.remove()
        runs[bf16] = (last["loss"], set(dtypes))
    assert runs[False][1] == {torch.float32} and runs[True][1] == {torch.bfloat16}
    assert np.isfinite(runs[True][0]) and runs[True][0] == pytest.approx(runs[False][0], rel=0.05)


def test_a_training_checkpoint_loads_as_its_ema_policy(tmp_path):
    train_tiny(tmp_path, "run", steps=4, checkpoint_every=2, keep_checkpoints=3, ema_decay=0.5)
    run = tmp_path / "run"
    exported = load_policy(run / "policy.pt").state_dict()
    for source in (run / "checkpoints", run / "checkpoints" / "ckpt-000000004.pt"):  # the latest is the last step's
        loaded = load_policy(source).state_dict()
        assert all(torch.equal(loaded[k], exported[k]) for k in exported)
    earlier, raw = load_policy(run / "checkpoints" / "ckpt-000000002.pt"), load_checkpoint(run / "checkpoints")
    assert not all(torch.equal(earlier.state_dict()[k], exported[k]) for k in exported)
    assert any(not torch.equal(raw["model"][k], raw["ema"][k]) for k in raw["ema"])  # the EMA, not the raw weights


def test_time_limit_ends_with_the_export(tmp_path):
    train_tiny(tmp_path, "run", steps=6, log_every=2, time_limit_min=1e-9)
    assert load_checkpoint(tmp_path / "run" / "policy.pt")["meta"]["step"] == 2
    with pytest.raises(ValueError, match="train.time_limit_min"):
        PolicyConfig(train=PolicyTrainConfig(time_limit_min=-1.0))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["drift", "ddpm"])
def test_compiled_training_matches_eager(tmp_path, method):
    """train.compile: the same steps to float rounding, and the exported policy has the plain network's keys."""
    losses = {}
    for compiled in (False, True):
        losses[compiled] = train_tiny(tmp_path, str(compiled), method=method, steps=3, compile=compiled)["loss"]
        load_policy(tmp_path / str(compiled) / "policy.pt")  # strict load: no "_orig_mod." keys
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


@pytest.mark.parametrize("name,method", [("policy/pusht", "drift"), ("policy/pusht_ddpm", "ddpm")])
def test_push_t_presets_load_by_name(name, method):
    cfg = load_config(PolicyConfig, resolve_preset(name))
    assert cfg.train.method == method and cfg.model.down_dims == (256, 512, 1024) and cfg.train.compile
    assert cfg.train.k_pos == 4 and cfg.data == DemoConfig()  # the data as Diffusion Policy splits it


def test_cli_takes_overrides_after_the_preset(tmp_path):
    from drifting.policy.train import cli as train_cli

    path = synthetic_zarr(tmp_path / "tiny.zarr")
    train_cli([str(tmp_path / "run"), "--preset", "policy/pusht", f"data.path={path}", "model.down_dims=[8,16]",
               "model.time_dim=8", "train.compile=false", "train.batch=8", "train.gen_per_obs=4", "train.steps=1",
               "train.device=cpu"])
    cfg = load_config(PolicyConfig, tmp_path / "run" / "config.yaml")
    assert cfg.model.down_dims == (8, 16) and cfg.train.batch == 8  # the overrides
    assert cfg.train.ema_decay == 0.999 and cfg.train.warmup_steps == 500  # the preset's, not the defaults
    assert (tmp_path / "run" / "policy.pt").is_file()


def test_eval_cli_scores_every_checkpoint_and_summarises_the_curve(tmp_path):
    train_tiny(tmp_path, "run", steps=3, checkpoint_every=1, keep_checkpoints=5)
    out = tmp_path / "curve.json"
    eval_cli([str(tmp_path / "run"), "--all-checkpoints", "--episodes", "2", "--max-steps", "9", "--device", "cpu",
              "--sample-seeds", "2", "--last", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["checkpoints"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    means = [r["score_mean_over_sample_seeds"] for r in rows]
    assert means == [pytest.approx(np.mean(r["scores_by_sample_seed"])) for r in rows]
    assert result["best"] == {"step": rows[int(np.argmax(means))]["step"], "score": max(means)}
    assert result["mean_of_last"] == {"checkpoints": 2, "first_step": 2, "score": pytest.approx(np.mean(means[1:]))}
    # each checkpoint is scored with its own weights (its EMA): the one-checkpoint command agrees with its row
    single = tmp_path / "single.json"
    eval_cli([str(tmp_path / "run" / "checkpoints" / "ckpt-000000001.pt"), "--episodes", "2", "--max-steps", "9",
              "--device", "cpu", "--out", str(single)])
    assert json.loads(single.read_text())["score"] == rows[0]["score"]


@pytest.mark.parametrize("args,named", [
    (["policy.pt", "--all-checkpoints"], "--all-checkpoints: expected a folder"),  # a file, not a checkpoints folder
    (["checkpoints", "--all-checkpoints", "--last", "0"], "--last: expected >= 1"),
    (["policy.pt", "--episodes", "0"], "--episodes: expected >= 1"),
])
def test_eval_cli_rejects_bad_arguments_naming_them(tmp_path, args, named, capsys):
    train_tiny(tmp_path, "run", steps=1, checkpoint_every=1)
    with pytest.raises(SystemExit):
        eval_cli([str(tmp_path / "run" / args[0]), *args[1:], "--device", "cpu"])
    assert named in capsys.readouterr().err


def test_score_spread():
    out = score_spread([1.0, 0.0, 0.5, 0.02])
    assert out["episodes_below_0.05"] == 2
    assert out["score_se"] == pytest.approx(np.std([1.0, 0.0, 0.5, 0.02], ddof=1) / 2)


def test_eval_cli_reports_the_spread_and_extra_sample_seeds(tmp_path):
    train_tiny(tmp_path, "run", steps=1)
    out = tmp_path / "eval.json"
    eval_cli([str(tmp_path / "run" / "policy.pt"), "--episodes", "2", "--max-steps", "9", "--device", "cpu",
              "--sample-seeds", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["scores_by_sample_seed"][0] == result["score"] and len(result["scores_by_sample_seed"]) == 2
    assert result["score_mean_over_sample_seeds"] == pytest.approx(np.mean(result["scores_by_sample_seed"]))
    assert "score_se" in result and 0 <= result["episodes_below_0.05"] <= 2
    with pytest.raises(SystemExit):
        eval_cli([str(tmp_path / "run" / "policy.pt"), "--sample-seeds", "0"])
