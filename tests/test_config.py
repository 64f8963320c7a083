from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from drifting.config import CONFIGS_DIR, config_to_dict, load_config, resolve_preset, save_config

# Module level (not inside tests) so get_type_hints can resolve the string annotations.


@dataclass(frozen=True)
class ModelCfg:
    hidden: tuple[int, ...] = (64, 64)
    act: Literal["relu", "gelu", "silu"] = "gelu"
    dropout: float = 0.0


@dataclass(frozen=True)
class TrainCfg:
    lr: float = 1e-3
    steps: int = 100
    amp: bool = False
    warmup: Optional[int] = None
    clip: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.99)

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError("steps must be positive")


@dataclass(frozen=True)
class Cfg:
    name: str = "run"
    seed: int = 0
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=lambda: TrainCfg(steps=500))


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults():
    cfg = load_config(Cfg)
    assert cfg == Cfg()
    assert cfg.train.steps == 500  # the parent's default_factory, not TrainCfg's own default
    assert cfg.model.hidden == (64, 64)


def test_yaml_preset_fills_nested_fields_partially(tmp_path):
    p = write_yaml(tmp_path / "p.yaml", {"seed": 3, "model": {"hidden": [128, 32]}, "train": {"lr": "1e-4"}})
    cfg = load_config(Cfg, p)
    assert cfg.seed == 3
    assert cfg.model.hidden == (128, 32) and isinstance(cfg.model.hidden, tuple)
    assert cfg.model.act == "gelu"  # untouched nested field keeps its default
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 500  # partial nested mapping starts from the parent's default instance
    assert cfg.name == "run"


def test_empty_preset_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(Cfg, p) == Cfg()


def test_overrides_all_types(tmp_path):
    cfg = load_config(
        Cfg,
        overrides=[
            "seed=7",
            "train.lr=1e-4",
            "train.amp=true",
            "name=exp one",
            "model.act=silu",
            "train.clip=null",
            "train.warmup=10",
            "model.hidden=[256, 256, 8]",
            "train.betas=(0.5,0.6)",
            "model.dropout=1",
        ],
    )
    assert cfg.seed == 7
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.amp is True
    assert cfg.name == "exp one"
    assert cfg.model.act == "silu"
    assert cfg.train.clip is None
    assert cfg.train.warmup == 10
    assert cfg.model.hidden == (256, 256, 8)
    assert cfg.train.betas == (0.5, 0.6)
    assert cfg.model.dropout == 1.0 and isinstance(cfg.model.dropout, float)


def test_overrides_apply_after_preset(tmp_path):
    p = write_yaml(tmp_path / "p.yaml", {"seed": 3, "train": {"lr": 0.5, "steps": 9}})
    cfg = load_config(Cfg, p, ["seed=4", "train.lr=0.25"])
    assert (cfg.seed, cfg.train.lr, cfg.train.steps) == (4, 0.25, 9)


def test_unknown_key_in_override():
    with pytest.raises(ValueError) as e:
        load_config(Cfg, overrides=["train.lrr=1"])
    msg = str(e.value)
    assert "train.lrr" in msg and "lr" in msg and "steps" in msg


def test_unknown_key_in_yaml(tmp_path):
    p = write_yaml(tmp_path / "p.yaml", {"model": {"width": 3}})
    with pytest.raises(ValueError, match=r"model\.width") as e:
        load_config(Cfg, p)
    assert "hidden" in str(e.value)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ValueError) as e:
        load_config(Cfg, overrides=["train.steps=abc"])
    msg = str(e.value)
    assert "train.steps" in msg and "int" in msg and "abc" in msg


def test_wrong_tuple_element_and_length():
    with pytest.raises(ValueError, match=r"model\.hidden\[1\].*int"):
        load_config(Cfg, overrides=["model.hidden=[1, x]"])
    with pytest.raises(ValueError, match=r"train\.betas.*2 elements"):
        load_config(Cfg, overrides=["train.betas=[0.1, 0.2, 0.3]"])


def test_bad_literal_lists_choices():
    with pytest.raises(ValueError) as e:
        load_config(Cfg, overrides=["model.act=tanh"])
    msg = str(e.value)
    assert "model.act" in msg and "relu" in msg and "silu" in msg and "tanh" in msg


def test_override_without_equals():
    with pytest.raises(ValueError, match="dotted.key=value"):
        load_config(Cfg, overrides=["train.lr"])


def test_bool_rejected_for_int_and_float():
    with pytest.raises(ValueError, match=r"seed.*int"):
        load_config(Cfg, overrides=["seed=true"])
    with pytest.raises(ValueError, match=r"train\.lr.*float"):
        load_config(Cfg, overrides=["train.lr=false"])


def test_none_rejected_for_non_optional():
    with pytest.raises(ValueError, match="train.lr"):
        load_config(Cfg, overrides=["train.lr=null"])


def test_nested_config_as_whole_needs_mapping(tmp_path):
    with pytest.raises(ValueError, match="model"):
        load_config(Cfg, overrides=["model=5"])
    with pytest.raises(ValueError, match=r"seed.*not a nested config"):
        load_config(Cfg, overrides=["seed.x=1"])


def test_post_init_still_runs():
    with pytest.raises(ValueError, match="steps must be positive"):
        load_config(Cfg, overrides=["train.steps=0"])


def test_round_trip(tmp_path):
    cfg = load_config(Cfg, overrides=["train.lr=1e-10", "name='true'", "train.clip=null", "model.hidden=[]"])
    path = tmp_path / "sub" / "cfg.yaml"
    save_config(cfg, path)
    d = config_to_dict(cfg)
    assert d["model"]["hidden"] == [] and d["train"]["betas"] == [0.9, 0.99]
    assert yaml.safe_load(path.read_text()) == d
    assert load_config(Cfg, path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["cfg.yaml"]  # no temp file left behind


def test_frozen():
    cfg = load_config(Cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


def test_resolve_preset(tmp_path):
    p = write_yaml(tmp_path / "mine.yaml", {"seed": 1})
    assert resolve_preset(p) == p
    assert resolve_preset(str(p)) == p
    with pytest.raises(FileNotFoundError) as e:
        resolve_preset("no/such_preset")
    msg = str(e.value)
    assert "no/such_preset" in msg
    assert str(CONFIGS_DIR / "no/such_preset.yaml") in msg
    assert "available presets" in msg
