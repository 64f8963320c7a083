"""Strict configuration over frozen dataclasses.

A config is a (nested) frozen dataclass. It is filled from its defaults, then an
optional YAML preset, then ``dotted.key=value`` overrides. Everything is checked
against the dataclass's type hints, so a typo or a wrongly typed value fails
loudly at start-up instead of silently training with the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from drifting.atomic import atomic_write

T = TypeVar("T")

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

__all__ = ["load_config", "config_to_dict", "save_config", "resolve_preset", "CONFIGS_DIR"]


def load_config(cls: type[T], preset: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file ``preset``, then ``overrides``."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    tree: dict = {}
    if preset is not None:
        with open(preset, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}  # an empty file means "all defaults"
        if not isinstance(tree, dict):
            raise ValueError(f"{preset}: top level must be a mapping, got {type(tree).__name__}")
    if isinstance(overrides, str):  # a lone string would otherwise be iterated per character
        overrides = [overrides]
    for item in overrides:
        _apply_override(cls, tree, item)
    # Build once from the merged tree, so __post_init__ sees only the final values.
    return _build(cls, tree, prefix="")


def config_to_dict(cfg: Any) -> Any:
    """Plain nested dict/list/scalar view of a config (tuples become lists), fit for YAML."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        # Only init fields: those are the ones load_config accepts back.
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML atomically: a crash never leaves a half-written file at ``path``."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def resolve_preset(name_or_path: str | os.PathLike) -> Path:
    """An existing file path as is, else ``configs/<name>.yaml`` under the repository root."""
    tried = [Path(name_or_path)]
    if tried[0].is_file():
        return tried[0]
    name = str(name_or_path)
    tried.append(CONFIGS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml"))
    if tried[1].is_file():
        return tried[1]
    available = sorted(p.relative_to(CONFIGS_DIR).with_suffix("").as_posix() for p in CONFIGS_DIR.rglob("*.yaml"))
    raise FileNotFoundError(
        f"no preset {name!r}: tried {', '.join(str(p) for p in tried)}; "
        f"available presets: {', '.join(available) or '(none)'}"
    )


# --------------------------------------------------------------------------- internals


def _init_fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    # get_type_hints resolves string annotations (``from __future__ import annotations``).
    hints = get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(prefix: str, key: Any, fields: dict) -> ValueError:
    hint = difflib.get_close_matches(str(key), list(fields), n=1)
    return ValueError(
        f"unknown config key '{_join(prefix, str(key))}'"
        + (f" (did you mean '{_join(prefix, hint[0])}'?)" if hint else "")
        + f"; valid keys{' under ' + repr(prefix) if prefix else ''}: {', '.join(fields)}"
    )


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _type_error(key: str, tp: Any, value: Any) -> ValueError:
    return ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass behind ``tp`` or ``Optional[tp]``, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        found = [a for a in get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _merge(old: dict, new: dict) -> dict:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _apply_override(cls: type, tree: dict, item: str) -> None:
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"bad override {item!r}: expected the form dotted.key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"override {key}: cannot parse value {raw!r} as YAML: {e}") from None
    # Walk the key through the dataclass (not just the dict) so a typo is reported
    # with the valid keys at the level where it occurred.
    parts = key.split(".")
    node, typ = tree, cls
    for i, name in enumerate(parts):
        fields = _init_fields(typ)
        if name not in fields:
            raise _unknown_key(".".join(parts[:i]), name, fields)
        if i == len(parts) - 1:
            break
        path = ".".join(parts[: i + 1])
        typ = _dataclass_in(fields[name][0])
        if typ is None:
            raise ValueError(f"cannot set '{key}': '{path}' is not a nested config")
        if node.get(name) is None:  # absent, or an Optional nested config that was null
            node[name] = {}
        if not isinstance(node[name], dict):
            raise _type_error(path, fields[name][0], node[name])
        node = node[name]
    old = node.get(name)
    node[name] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value


def _build(cls: type, data: Any, prefix: str, base: Any = None) -> Any:
    """Instantiate ``cls`` from mapping ``data``; fields not in ``data`` come from ``base`` or defaults."""
    fields = _init_fields(cls)
    if not isinstance(data, dict):
        raise _type_error(prefix or cls.__name__, cls, data)
    for name in data:
        if name not in fields:
            raise _unknown_key(prefix, name, fields)
    kwargs = {}
    for name, (tp, f) in fields.items():
        key = _join(prefix, name)
        # A partial mapping for a nested config starts from the parent's default instance
        # (which may differ from the nested class's own defaults), not from scratch.
        current = getattr(base, name) if base is not None else None
        if name in data:
            kwargs[name] = _convert(data[name], tp, key, current if base is not None else _default(f))
        elif base is not None:
            kwargs[name] = current
        elif _default(f) is dataclasses.MISSING:
            raise ValueError(f"missing required config key '{key}'")
    return cls(**kwargs)  # through the class, so its own __post_init__ validation runs


def _convert(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        return _build(tp, value, key, base if isinstance(base, tp) else None)
    if origin is Literal:
        # Compare types too: True == 1, but true is not a valid choice for Literal[1].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ValueError(f"{key}: expected one of {list(args)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alt in args:
            if alt is not type(None):
                try:
                    return _convert(value, alt, key, base)
                except ValueError:
                    pass
        raise _type_error(key, tp, value)
    if origin is tuple:
        if isinstance(value, str) and value.strip().startswith("(") and value.strip().endswith(")"):
            value = yaml.safe_load("[" + value.strip()[1:-1] + "]")  # allow model.hidden=(256,256)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ValueError(f"{key}: expected {_type_name(tp)} with {len(args)} elements, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    if tp in (bool, int, float, str):
        raise _type_error(key, tp, value)
    raise TypeError(f"{key}: unsupported config field type {_type_name(tp)}")
