"""Shared plumbing for `experiments/*.py`: command line, data folders, workdir, metrics.json.

Every experiment is run as::

    python -m experiments.<name> --data_dir DIR --workdir DIR [--preset smoke] \
        [--config.key=value ...]

and is written as two functions, `get_config(preset="default") -> ConfigDict` and
`run(config, data_dir, workdir) -> dict` of flat metrics; its `__main__` block is
`common.main(get_config, run)`. `main` parses the command line, applies the overrides (typed by
the field they replace), creates the workdir, saves `config.json`, times the run and writes
`WORKDIR/metrics.json` with the run's metrics plus `seconds`.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from fgloc.cache import cached_cells, cached_npz

__all__ = [
    "cached_cells",
    "cached_npz",
    "main",
    "parse_args",
    "resolve_data_dir",
    "write_metrics",
]


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


def resolve_data_dir(
    data_dir: str | pathlib.Path, name: str, required: Sequence[str] = ()
) -> pathlib.Path:
    """Finds dataset folder `name` given either that folder or the folder that holds it.

    Args:
      data_dir: `.../CUB_200_2011` itself or its parent (e.g. `../shared/data`).
      name: the dataset folder's name, e.g. `"CUB_200_2011"` or `"imagenet_val_sample"`.
      required: relative paths that must exist inside it (e.g. `("images.txt",)`).
    Raises:
      FileNotFoundError naming the folders tried and the missing entries.
    """
    data_dir = pathlib.Path(data_dir).expanduser()
    candidates = [data_dir / name, data_dir]
    for cand in candidates:
        if cand.is_dir() and all((cand / r).exists() for r in required):
            return cand
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"--data_dir {data_dir}: no {name} folder with {list(required)} found (tried {tried})"
    )


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray) and np.ndim(value) == 0:
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    raise TypeError(f"metric value {value!r} ({type(value).__name__}) is not a scalar")


def write_metrics(workdir: str | pathlib.Path, metrics: Mapping[str, Any]) -> pathlib.Path:
    """Writes flat scalar `metrics` to `workdir/metrics.json` (sorted keys); returns the path.

    Numpy scalars become Python numbers, NaN/inf become `null`; nested values raise TypeError.
    """
    flat = {str(k): _to_json(v) for k, v in metrics.items()}
    path = pathlib.Path(workdir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    return path


def main(
    get_config: Callable[..., ml_collections.ConfigDict],
    run: Callable[[ml_collections.ConfigDict, pathlib.Path, pathlib.Path], Mapping[str, Any]],
    argv: Sequence[str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Command-line entry: parse, make workdir, save config, run, time, write metrics.json.

    `run(config, data_dir, workdir)` returns flat scalar metrics; `seconds` (wall clock of
    `run`) is added. Returns the metrics as written.
    """
    config, data_dir, workdir = parse_args(argv, get_config, description)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json(indent=2, sort_keys=True) + "\n")
    start = time.perf_counter()
    metrics = dict(run(config, data_dir, workdir))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_metrics(workdir, metrics)
    print(json.dumps({k: _to_json(v) for k, v in metrics.items()}, indent=2, sort_keys=True))
    return metrics
