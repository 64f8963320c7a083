"""The command line: help, a tiny toy run end to end, the resolved config, and errors for bad configuration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from drifting.cli import main

TINY = ["steps=5", "batch=16", "num_pos=16", "eval_samples=50", "track_every=5", "inits=[between]"]


def test_help_lists_the_toy_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "toy" in capsys.readouterr().out


def test_toy_command_runs_and_saves_resolved_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["toy", "--no-progress", "--out", str(out), "--preset", "toy/ring8", *TINY]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["target"] == "ring8" and config["steps"] == 5 and config["inits"] == ["between"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]["default"]) == {"between"}
    assert (out / "figure3_evolution.png").exists() and (out / "figure4_loss.png").exists()
    assert "floor" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["stepz=5"], "stepz"),  # unknown key
        (["steps=five"], "steps"),  # wrong type
        (["target=nowhere"], "target"),
        (["--preset", "toy/nowhere"], "toy/nowhere"),
    ],
)
def test_toy_command_rejects_bad_configuration(tmp_path, capsys, args, message):
    assert main(["toy", "--no-progress", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "metrics.json").exists()  # rejected before any work


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "drifting", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "drifting" in result.stdout


def test_train_then_sample_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(run), "train.steps=2", "train.classes=2",
                 "train.gen_per_class=4", "train.pos_per_class=4", "train.uncond_per_class=2"]) == 0
    assert main(["sample", str(run / "ema.pt"), "--out", str(tmp_path / "s.npz"), "--num-per-class", "3",
                 "--device", "cpu"]) == 0
    import numpy as np

    with np.load(tmp_path / "s.npz") as samples:
        arrays = {k: samples[k] for k in samples.files}
    images = next(v for v in arrays.values() if v.ndim == 4)
    assert images.shape[0] == 3 * 4 and images.dtype == np.uint8  # 4 classes of the synthetic set, 3 each


def test_sample_rejects_bad_alpha(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing.pt"), "--alpha", "0.5"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["policy-train", "policy-eval"])
def test_policy_commands_hand_over_to_their_own_parsers(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "Push-T" in capsys.readouterr().out


def test_train_mae_command_writes_the_encoder(tmp_path):
    assert main(["train-mae", "--no-progress", "--out", str(tmp_path), "train.steps=2"]) == 0
    assert (tmp_path / "encoder.pt").exists() and (tmp_path / "config.yaml").exists()
