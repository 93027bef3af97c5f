"""Shared plumbing for `experiments/*.py`: command line, data folders, workdir, metrics.json.

Every experiment ``experiments/<name>.py`` is one function ``run(config, data_dir, workdir) ->
dict`` of flat scalar metrics; its named configurations live in ``experiments/configs/<name>.py``
as ``get_config(name=None) -> ConfigDict`` (``"default"`` when ``None``, ``"smoke"``, and one
per README row). Its ``__main__`` block is ``common.main(run)``, and it is run as::

    python -m experiments.<name> [--config experiments/configs/<name>.py[:<preset>]] \
        --workdir DIR [--data_dir DIR] [--config.<field>=<value> ...]

`main` parses the command line with absl flags and ml_collections ``config_flags`` (overrides
are typed by the field they replace; an unknown field is an error), creates the workdir, saves
``config.json``, times the run and writes ``WORKDIR/metrics.json`` with the run's metrics plus
``seconds``. ``--data_dir`` (default ``../shared/data``) is the folder that holds
``CUB_200_2011/`` and ``imagenet_val_sample/``; `resolve_data_dir` finds a dataset in it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from fgloc.cache import cached_cells, cached_npz

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_DATA_DIR",
    "apply_overrides",
    "cached_cells",
    "cached_npz",
    "main",
    "parse_args",
    "resolve_data_dir",
    "save_box_figure",
    "write_metrics",
]

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"
DEFAULT_DATA_DIR = "../shared/data"

Run = Callable[[ml_collections.ConfigDict, pathlib.Path, pathlib.Path], Mapping[str, Any]]


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies ``field=value`` overrides (dotted fields into sub-configs) to ``config`` in place.

    The parsing is ml_collections' own (``config_flags.DEFINE_config_dict`` over the flags
    ``--config.<field>=<value>``): values are typed by the field they replace and an unknown
    field raises. Returns ``config``.
    """
    argv = ["apply_overrides", *(f"--config.{item}" for item in overrides)]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_dict(
        "config", config, flag_values=fv, sys_argv=argv, lock_config=True
    )
    fv(argv)
    return holder.value


@contextlib.contextmanager
def _quiet_config_loading() -> Iterator[None]:
    """config_flags loads config files with the deprecated ``load_module`` (Python 3.11)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        yield


def _experiment_name(run: Callable[..., Any]) -> str:
    """``cam_cub`` for a ``run`` defined in ``experiments/cam_cub.py`` (also under ``-m``)."""
    return pathlib.Path(inspect.getfile(run)).stem


def parse_args(
    run: Callable[..., Any], argv: Sequence[str] | None = None
) -> tuple[ml_collections.ConfigDict, pathlib.Path, pathlib.Path]:
    """Parses ``--config``, ``--workdir``, ``--data_dir`` and ``--config.<field>`` overrides.

    Args:
      run: the experiment's ``run``; its file name picks the default config file
        ``experiments/configs/<name>.py`` (its ``"default"`` preset).
      argv: the arguments without the program name (default ``sys.argv[1:]``).
    Returns:
      ``(config, data_dir, workdir)``.
    Raises:
      SystemExit(2) with a message on stderr for a bad command line; ``--help`` prints the
      flags and exits 0.
    """
    name = _experiment_name(run)
    args = list(sys.argv[1:] if argv is None else argv)
    full = [f"python -m experiments.{name}", *args]
    fv = flags.FlagValues()
    default = CONFIG_DIR / f"{name}.py"
    with _quiet_config_loading():
        holder = config_flags.DEFINE_config_file(
            "config",
            default=str(default) if default.is_file() else None,
            help_string=f"config file and preset, e.g. experiments/configs/{name}.py:smoke",
            flag_values=fv,
            sys_argv=full,
        )
    workdir = flags.DEFINE_string(
        "workdir", None, "folder for config.json, metrics.json, caches", flag_values=fv
    )
    data_dir = flags.DEFINE_string(
        "data_dir",
        DEFAULT_DATA_DIR,
        "folder holding CUB_200_2011/ and imagenet_val_sample/",
        flag_values=fv,
    )
    if any(a in ("-h", "--help", "--helpfull") for a in args):
        print(f"{full[0]}: {(inspect.getdoc(sys.modules[run.__module__]) or '').splitlines()[0]}")
        print(fv.get_help())
        raise SystemExit(0)
    try:
        with _quiet_config_loading():
            rest = fv(full)
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments {rest[1:]}")
        if workdir.value is None:
            raise flags.Error("--workdir is required")
        config = holder.value
        if config is None:
            raise flags.Error("--config is required (no default config file)")
        config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy for `run`
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        message = lines[-1] if len(lines) > 3 else " ".join(lines)  # a config file's traceback
        print(f"{full[0]}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from err
    return config, pathlib.Path(data_dir.value), pathlib.Path(workdir.value)


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


_LOCKS: dict[pathlib.Path, Any] = {}  # open lock files, held until the process ends


def _lock_workdir(workdir: pathlib.Path) -> None:
    """An exclusive lock on ``WORKDIR/.lock`` for this process's lifetime, so that two runs
    never write one workdir's caches and stage checkpoints at once (they would race; a rerun
    after the first has finished or died resumes as usual: the OS drops the lock with the
    process). ValueError naming the workdir and the holder's pid when another run holds it."""
    import fcntl

    path = workdir.resolve() / ".lock"
    if path in _LOCKS:  # this process already holds it (several runs in one process)
        return
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ValueError(
            f"--workdir {workdir}: another run (pid {holder}) is using it; wait for it to end "
            "or pass another --workdir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[path] = f


def main(run: Run, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry of an experiment: parse, make workdir, save config, run, time, write.

    ``run(config, data_dir, workdir)`` returns flat scalar metrics; ``seconds`` (wall clock of
    ``run``) is added and the metrics are written to ``WORKDIR/metrics.json`` (and printed).
    ``argv`` excludes the program name (default ``sys.argv[1:]``); see `parse_args`. Returns
    the metrics as written.
    """
    from fgloc import distributed

    # One process per host (or GPU) runs the same command: start jax.distributed first (a no-op
    # for a single process; README "More than one machine"). Every process runs the experiment,
    # its caches split their rows over the processes, and process 0 alone writes the files.
    distributed.initialize()
    config, data_dir, workdir = parse_args(run, argv)
    main_process = distributed.is_main_process()
    workdir.mkdir(parents=True, exist_ok=True)
    if main_process:
        _lock_workdir(workdir)
        (workdir / "config.json").write_text(config.to_json(indent=2, sort_keys=True) + "\n")
    start = time.perf_counter()
    from fgloc.train.trainer import TrainingInterrupted

    try:
        metrics = dict(run(config, data_dir, workdir))
    except TrainingInterrupted as err:  # SIGTERM mid-stage: checkpointed, stop (128 + 15)
        print(f"interrupted: {err}", file=sys.stderr)
        raise SystemExit(143) from err
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    if main_process:
        write_metrics(workdir, metrics)
        print(json.dumps({k: _to_json(v) for k, v in metrics.items()}, indent=2, sort_keys=True))
    return metrics


def save_box_figure(
    path: pathlib.Path,
    paths: Sequence[str],
    maps: np.ndarray,
    pred: np.ndarray,
    gt: Sequence[np.ndarray],
    titles: Sequence[str],
) -> None:
    """Saves a grid of photos with their map overlaid, predicted box (red), ground truth (green).

    Args:
      path: PNG to write (folders are created).
      paths: the photos (any size; read with `fgloc.data.images.load_image`).
      maps: ``(N, h, w)`` maps over each whole photo (min-max normalised and resized to it).
      pred: ``(N, 4)`` predicted boxes, photo pixels.
      gt: ``N`` arrays ``(k, 4)`` of ground-truth boxes, photo pixels.
      titles: one title per photo.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from fgloc.data.images import load_image
    from fgloc.data.pipeline import resize_image
    from fgloc.maps.normalize import minmax_normalize

    n = len(paths)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, ax in enumerate(axes.ravel()[:n]):
        img = load_image(paths[i])
        h, w = img.shape[:2]
        m = minmax_normalize(maps[i].astype(np.float64))
        heat = resize_image((255 * m).astype(np.uint8)[..., None].repeat(3, -1), (h, w))[..., 0]
        ax.imshow(img)
        ax.imshow(heat, cmap="jet", alpha=0.45)
        for b in np.asarray(gt[i]).reshape(-1, 4):
            ax.add_patch(Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=2))
        b = pred[i]
        ax.add_patch(Rectangle(b[:2], b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=2))
        ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
