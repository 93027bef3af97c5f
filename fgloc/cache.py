"""One cache for everything fgloc computes once and reuses: converted weights, features,
per-(image, channel) centres.

* `digest(key)`: the one cache-key scheme (SHA-256 of a sorted JSON dump). A key describes
  *what produced* the arrays: the source's content hash and the converter's version for
  weights, the backbone / layer / image list for features.
* `save_npz` / `load_npz`: atomic writes; a corrupt or foreign entry is never trusted.
* `cached_npz(path, compute, key)`: a whole result keyed by ``key``.
* `cached_cells(path, key, rows, cols, compute)`: a resumable table, one cell per (row, column),
  filled chunk by chunk, so an interrupted run loses at most one chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["cached_cells", "cached_npz", "digest", "load_npz", "save_npz"]


def digest(key: Any) -> str:
    """SHA-256 (hex) of a JSON-serialisable cache key (sorted keys; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def save_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``arrays`` to ``path`` atomically (a unique temporary file, then a rename), so an
    interrupted write or a concurrent writer never leaves a half-written file behind."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}.npz")
    try:
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})  # pyright: ignore[reportArgumentType]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_npz(path: str | os.PathLike, key: Any = None) -> dict[str, np.ndarray] | None:
    """The arrays in ``path``, or None when it is missing, unreadable (a corrupt entry is
    deleted, never trusted) or was written for another ``key`` (stored as ``__key__``)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if key is not None and ("__key__" not in data or str(data["__key__"]) != digest(key)):
                return None
            return {k: data[k] for k in data.files if k != "__key__"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError):
        path.unlink(missing_ok=True)
        return None


def cached_npz(
    path: str | pathlib.Path,
    compute: Callable[[], Mapping[str, np.ndarray]],
    key: Any,
) -> dict[str, np.ndarray]:
    """Loads arrays from `path` if it was written for the same `key`, else computes and saves.

    `key` is any JSON-serialisable description of what produced the arrays (backbone, input
    size, image list, ...); its hash is stored in the file as `__key__`, so a changed config
    recomputes instead of silently reusing stale features.
    """
    cached = load_npz(path, key)
    if cached is not None:
        return cached
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    save_npz(path, {"__key__": np.asarray(digest(key)), **arrays})
    return arrays


def cached_cells(
    path: str | pathlib.Path,
    key: Any,
    rows: Sequence[int] | np.ndarray,
    cols: Sequence[int] | np.ndarray,
    compute: Callable[[np.ndarray, np.ndarray], np.ndarray],
    chunk: int = 16,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Resumable cache of a table of arrays, one cell per (row, column): -> ``(len(rows), len(cols), ...)``.

    For costly per-image, per-channel results (centres of channel gradient maps): rows are image
    ids, columns channel ids. Cells already in `path` for the same `key` are reused whatever
    subset asked for them, so a run on more images or other channels computes only what is
    new; `compute(row_ids, col_ids)` must return ``(len(row_ids), len(col_ids), ...)``. Missing
    cells are computed `chunk` rows at a time and the file is rewritten (atomically) after each
    chunk, so an interrupted run loses at most one chunk. `progress(n)` is called with the
    number of rows finished after each chunk. A file written for another `key` is replaced.
    """
    path = pathlib.Path(path)
    rows = np.asarray(rows, np.int64).reshape(-1)
    cols = np.asarray(cols, np.int64).reshape(-1)
    for name, ids in (("rows", rows), ("cols", cols)):
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"cached_cells({path}): {name} has repeated ids")
    c_rows, c_cols = np.zeros(0, np.int64), np.zeros(0, np.int64)
    values: np.ndarray | None = None
    have = np.zeros((0, 0), bool)
    data = load_npz(path, key)
    if data is not None and {"rows", "cols", "values", "have"} <= set(data):
        c_rows, c_cols = data["rows"], data["cols"]
        values, have = data["values"], data["have"]

    def grow(ids: np.ndarray, new: np.ndarray, axis: int) -> np.ndarray:
        nonlocal values, have
        add = np.setdiff1d(new, ids)
        if len(add) and values is not None:
            pad = [(0, 0)] * values.ndim
            pad[axis] = (0, len(add))
            values = np.pad(values, pad, constant_values=np.nan if values.dtype.kind == "f" else 0)
            have = np.pad(have, pad[:2])
        return np.concatenate([ids, add])

    c_rows = grow(c_rows, rows, 0)
    c_cols = grow(c_cols, cols, 1)
    if values is None:
        have = np.zeros((len(c_rows), len(c_cols)), bool)
    r_at = {int(r): i for i, r in enumerate(c_rows)}
    k_at = {int(c): j for j, c in enumerate(c_cols)}
    ri = np.asarray([r_at[int(r)] for r in rows], np.int64)
    ci = np.asarray([k_at[int(c)] for c in cols], np.int64)

    def save() -> None:
        save_npz(
            path,
            {
                "__key__": digest(key),
                "rows": c_rows,
                "cols": c_cols,
                "values": values,
                "have": have,
            },
        )

    # Rows grouped by which requested columns they miss (in practice: new rows miss all of
    # them, cached rows miss the newly requested columns), computed chunk by chunk.
    missing = ~have[np.ix_(ri, ci)]
    done = int((~missing.any(axis=1)).sum())
    if progress is not None and done:
        progress(done)
    groups: dict[bytes, list[int]] = {}
    for i in np.flatnonzero(missing.any(axis=1)):
        groups.setdefault(missing[i].tobytes(), []).append(int(i))
    for pattern, members in groups.items():
        need = ci[np.frombuffer(pattern, bool)]
        for s in range(0, len(members), chunk):
            part = ri[members[s : s + chunk]]
            out = np.asarray(compute(c_rows[part], c_cols[need]))
            if out.shape[:2] != (len(part), len(need)):
                raise ValueError(
                    f"cached_cells({path}): compute returned {out.shape}, "
                    f"want ({len(part)}, {len(need)}, ...)"
                )
            if values is None:
                values = np.full((len(c_rows), len(c_cols), *out.shape[2:]), np.nan, out.dtype)
            values[np.ix_(part, need)] = out
            have[np.ix_(part, need)] = True
            save()
            if progress is not None:
                progress(len(part))
    assert values is not None
    return values[np.ix_(ri, ci)]
