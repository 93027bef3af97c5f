"""Transitional: the old hand-written override parser, until every experiment uses configs/."""

from __future__ import annotations

import argparse
import ast
import inspect
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections


def _parse_value(text: str, old: Any) -> Any:
    """Turns an override string into the type of the field it replaces."""
    if isinstance(old, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(old, str):
        return text
    if old is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    value = ast.literal_eval(text)
    if isinstance(old, tuple | list):
        return type(old)(value if isinstance(value, tuple | list) else (value,))
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies `key=value` overrides (dotted keys into nested ConfigDicts) in place.

    Unknown keys raise `KeyError` naming the key, so a typo cannot be silently ignored.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        *parents, leaf = key.split(".")
        node: Any = config
        for part in parents:
            if part not in node:
                raise KeyError(f"--config.{key}: no field {part!r} in the config")
            node = node[part]
        if leaf not in node:
            raise KeyError(
                f"--config.{key}: no field {leaf!r}; known fields: {sorted(node.keys())}"
            )
        try:
            node[leaf] = _parse_value(text, node[leaf])
        except (ValueError, SyntaxError, TypeError) as err:
            raise ValueError(f"--config.{key}={text!r}: {err}") from err


def parse_args(
    argv: Sequence[str] | None,
    get_config: Callable[..., ml_collections.ConfigDict],
    description: str | None = None,
) -> tuple[ml_collections.ConfigDict, pathlib.Path, pathlib.Path]:
    """Parses `--data_dir`, `--workdir`, `--preset` and `--config.key=value` overrides.

    `--config.key value` (space-separated) is accepted too. Returns `(config, data_dir,
    workdir)`; the config is `get_config(preset)` with the overrides applied.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data_dir", required=True, type=pathlib.Path)
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--preset", default="default", help="named config, e.g. 'smoke'")
    args, rest = parser.parse_known_args(argv)
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r}")
        item = item[len("--config.") :]
        if "=" not in item:
            if i + 1 >= len(rest):
                parser.error(f"--config.{item} needs a value")
            item = f"{item}={rest[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    if inspect.signature(get_config).parameters:
        config = get_config(args.preset)
    elif args.preset != "default":
        parser.error(f"this experiment has no presets (got --preset {args.preset})")
    else:
        config = get_config()
    apply_overrides(config, overrides)
    return config, args.data_dir, args.workdir
