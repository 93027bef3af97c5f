"""One cache for everything fgloc computes once and reuses: converted weights, features,
per-(image, channel) centres.

* `digest(key)`: the one cache-key scheme (SHA-256 of a sorted JSON dump). A key describes
  *what produced* the arrays: the source's content hash and the converter's version for
  weights, the backbone / layer / image list for features.
* `save_npz` / `load_npz`: atomic writes; a corrupt or foreign entry is never trusted.
* `cached_npz(path, compute, key)`: a whole result keyed by ``key``.
* `cached_cells(path, key, rows, cols, compute)`: a resumable table, one cell per (row, column),
  filled chunk by chunk, so an interrupted run loses at most one chunk; several processes fill
  it together, each writing its own file beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
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


class _Table:
    """A (row, column) table of cells: ids, values ``(R, C, ...)`` and a `have` mask ``(R, C)``."""

    def __init__(self) -> None:
        self.rows = np.zeros(0, np.int64)
        self.cols = np.zeros(0, np.int64)
        self.values: np.ndarray | None = None
        self.have = np.zeros((0, 0), bool)

    def grow(self, rows: np.ndarray, cols: np.ndarray) -> None:
        """Adds the ids of `rows` / `cols` not yet in the table (empty cells)."""
        add_r = np.setdiff1d(rows, self.rows)
        add_c = np.setdiff1d(cols, self.cols)
        if self.values is not None and (len(add_r) or len(add_c)):
            pad = [(0, len(add_r)), (0, len(add_c))] + [(0, 0)] * (self.values.ndim - 2)
            fill = np.nan if self.values.dtype.kind == "f" else 0
            self.values = np.pad(self.values, pad, constant_values=fill)
        self.have = np.pad(self.have, [(0, len(add_r)), (0, len(add_c))])
        self.rows = np.concatenate([self.rows, add_r]).astype(np.int64)
        self.cols = np.concatenate([self.cols, add_c]).astype(np.int64)

    def index(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of `rows` / `cols` (all in the table) along its two axes."""
        r_at = {int(r): i for i, r in enumerate(self.rows)}
        k_at = {int(c): j for j, c in enumerate(self.cols)}
        return (
            np.asarray([r_at[int(r)] for r in rows], np.int64),
            np.asarray([k_at[int(c)] for c in cols], np.int64),
        )

    def put(self, ri: np.ndarray, ci: np.ndarray, values: np.ndarray, mask: np.ndarray) -> None:
        """Stores ``values[mask]`` at cells ``(ri, ci)`` (``values``: ``(len(ri), len(ci), ...)``)."""
        if self.values is None:
            shape = (len(self.rows), len(self.cols), *values.shape[2:])
            fill = np.nan if values.dtype.kind == "f" else 0
            self.values = np.full(shape, fill, values.dtype)
        block = self.values[np.ix_(ri, ci)]
        block[mask] = values[mask]
        self.values[np.ix_(ri, ci)] = block
        self.have[np.ix_(ri, ci)] |= mask

    def merge(self, data: Mapping[str, np.ndarray]) -> None:
        """Adds the filled cells of a stored table."""
        self.grow(data["rows"], data["cols"])
        ri, ci = self.index(data["rows"], data["cols"])
        if data["have"].any():
            self.put(ri, ci, data["values"], data["have"])

    def mask(self, data: Mapping[str, np.ndarray] | None) -> np.ndarray:
        """The filled cells of a stored table (merged before) in this table's layout."""
        mask = np.zeros_like(self.have)
        if data is not None:
            ri, ci = self.index(data["rows"], data["cols"])
            mask[np.ix_(ri, ci)] = data["have"]
        return mask

    def arrays(self, key: Any, mask: np.ndarray | None = None) -> dict[str, Any]:
        """What `save_npz` writes: all cells, or only the rows with a cell in `mask` (and
        `have` restricted to `mask`)."""
        rows, have, values = self.rows, self.have, self.values
        if mask is not None:
            keep = mask.any(axis=1)
            rows, have = rows[keep], (have & mask)[keep]
            values = None if values is None else values[keep]
        return {"__key__": digest(key), "rows": rows, "cols": self.cols, "values": values, "have": have}  # fmt: skip


def _load_cells(path: pathlib.Path, key: Any) -> dict[str, np.ndarray] | None:
    data = load_npz(path, key)
    return data if data is not None and set(data) >= {"rows", "cols", "values", "have"} else None


def _shard_path(path: pathlib.Path, process: int) -> pathlib.Path:
    """Where process `process` of a multi-process run writes its cells of `path`."""
    return path.with_name(f"{path.stem}.proc{process}{path.suffix}")


def _shard_paths(path: pathlib.Path) -> list[pathlib.Path]:
    pattern = re.compile(rf"^{re.escape(path.stem)}\.proc(\d+){re.escape(path.suffix)}$")
    if not path.parent.is_dir():
        return []
    found = [(int(m.group(1)), f) for f in path.parent.iterdir() if (m := pattern.match(f.name))]
    return [f for _, f in sorted(found)]


def cached_cells(
    path: str | pathlib.Path,
    key: Any,
    rows: Sequence[int] | np.ndarray,
    cols: Sequence[int] | np.ndarray,
    compute: Callable[[np.ndarray, np.ndarray], np.ndarray],
    chunk: int = 16,
    progress: Callable[[int], Any] | None = None,
    *,
    distributed: bool | None = None,
) -> np.ndarray:
    """Resumable cache of a table of arrays, one cell per (row, column): -> ``(len(rows), len(cols), ...)``.

    For costly per-image, per-channel results (centres of channel gradient maps): rows are image
    ids, columns channel ids. Cells already in `path` for the same `key` are reused whatever
    subset asked for them, so a run on more images or other channels computes only what is
    new; `compute(row_ids, col_ids)` must return ``(len(row_ids), len(col_ids), ...)``. Missing
    cells are computed `chunk` rows at a time and the file is rewritten (atomically) after each
    chunk, so an interrupted run loses at most one chunk. `progress(n)` is called with the
    number of rows finished after each chunk. A file written for another `key` is replaced.

    Several processes (`distributed`; default: when `fgloc.distributed.initialize` started a
    multi-process run): every process calls `cached_cells` with the same arguments; the rows
    with missing cells are split into contiguous blocks over the processes, each process
    computes only its block (its `compute` sees only its rows; it may spread them over its
    local devices with ``fgloc.distributed.map_rows(..., across_processes=False)``) and
    writes its cells, chunk by chunk, to its own file ``<stem>.proc<i><suffix>`` beside
    `path`; after a barrier every process reads all of them and returns the whole table.
    Readers always merge `path` with every ``.proc<i>`` file for the same key, so a later run
    with any number of processes reuses what several wrote; a single-process run folds them
    into `path` and deletes them.
    """
    path = pathlib.Path(path)
    rows = np.asarray(rows, np.int64).reshape(-1)
    cols = np.asarray(cols, np.int64).reshape(-1)
    for name, ids in (("rows", rows), ("cols", cols)):
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"cached_cells({path}): {name} has repeated ids")
    if distributed is None:
        from fgloc import distributed as dist

        distributed = dist.is_multiprocess()
    proc, nproc = 0, 1
    if distributed:
        from fgloc import distributed as dist

        proc, nproc = dist.process_index(), dist.process_count()
    table = _Table()
    own = None  # this process's own file (several processes)
    shards = _shard_paths(path)
    for i, file in enumerate([path, *shards]):
        data = _load_cells(file, key)
        if data is not None:
            table.merge(data)
            if distributed and i and file == _shard_path(path, proc):
                own = data
    if distributed:
        dist.barrier(f"fgloc.cache.cached_cells:read:{path.name}")  # every read before any write
    table.grow(rows, cols)
    mine = table.mask(own)  # the cells this process's file holds
    ri, ci = table.index(rows, cols)

    def save() -> None:
        if distributed:
            save_npz(_shard_path(path, proc), table.arrays(key, mine))
        else:
            save_npz(path, table.arrays(key))
            for shard in shards:  # now folded into `path`
                shard.unlink(missing_ok=True)

    # Rows grouped by which requested columns they miss (in practice: new rows miss all of
    # them, cached rows miss the newly requested columns), computed chunk by chunk.
    missing = ~table.have[np.ix_(ri, ci)]
    done = int((~missing.any(axis=1)).sum())
    if progress is not None and done:
        progress(done)
    todo = np.flatnonzero(missing.any(axis=1))
    if distributed:
        from fgloc import distributed as dist

        todo = todo[dist.process_rows(len(todo), proc, nproc)]
    groups: dict[bytes, list[int]] = {}
    for i in todo:
        groups.setdefault(missing[i].tobytes(), []).append(int(i))
    for pattern, members in groups.items():
        need = ci[np.frombuffer(pattern, bool)]
        for s in range(0, len(members), chunk):
            part = ri[members[s : s + chunk]]
            out = np.asarray(compute(table.rows[part], table.cols[need]))
            if out.shape[:2] != (len(part), len(need)):
                raise ValueError(
                    f"cached_cells({path}): compute returned {out.shape}, "
                    f"want ({len(part)}, {len(need)}, ...)"
                )
            table.put(part, need, out, np.ones(out.shape[:2], bool))
            mine[np.ix_(part, need)] = True
            save()
            if progress is not None:
                progress(len(part))
    if distributed:
        dist.barrier(f"fgloc.cache.cached_cells:written:{path.name}")
        for shard in _shard_paths(path):
            data = _load_cells(shard, key)
            if data is not None:
                table.merge(data)
        table.grow(rows, cols)
        ri, ci = table.index(rows, cols)
    elif shards and not len(todo):
        save()  # nothing was missing: fold the processes' files into `path`
    if not table.have[np.ix_(ri, ci)].all():
        raise RuntimeError(
            f"cached_cells({path}): cells still missing after computing (a process's file "
            "was lost or written for another key)"
        )
    assert table.values is not None
    return table.values[np.ix_(ri, ci)]
