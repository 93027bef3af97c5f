"""fgloc.distributed and multi-process training / caches (issue 16).

Two local processes x two CPU devices each (gloo collectives, a coordinator on a loopback port
picked here) run `tests/_distributed_worker.py`; their results are compared with one process x
four devices (this pytest process, see conftest.py). Every started process is killed and
waited for, whatever happens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fgloc import distributed, train
from fgloc.cache import cached_cells, digest, save_npz

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER_PATH = pathlib.Path(__file__).with_name("_distributed_worker.py")
_spec = importlib.util.spec_from_file_location("_distributed_worker", WORKER_PATH)
assert _spec is not None and _spec.loader is not None
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

ENV_VARS = (
    distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
    distributed.ENV_MODE, distributed.ENV_HEARTBEAT, "JAX_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
)  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: pathlib.Path, timeout: float) -> tuple[list[int], list[str]]:
    """Runs two worker processes to completion; returns their exit codes and logs."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))  # fmt: skip
    procs: list[subprocess.Popen] = []
    logs = [out / f"{mode}-{i}.log" for i in range(2)]
    try:
        with contextlib.ExitStack() as stack:
            for i in range(2):
                log = stack.enter_context(open(logs[i], "w"))
                cmd = [sys.executable, str(WORKER_PATH), mode, str(out), str(i), "2", str(port)]
                own = {
                    distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                    distributed.ENV_NUM_PROCESSES: "2",
                    distributed.ENV_PROCESS_ID: str(i),
                    distributed.ENV_HEARTBEAT: "5",
                }
                procs.append(
                    subprocess.Popen(cmd, env={**env, **own}, stdout=log, stderr=subprocess.STDOUT)
                )
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(timeout=timeout))
                except subprocess.TimeoutExpired:
                    pytest.fail(f"worker {mode} did not finish within {timeout} s (it hangs)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return codes, [f.read_text() for f in logs]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


# --- single process -----------------------------------------------------------------------


def test_initialize_is_a_noop_for_one_process(monkeypatch):
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    assert distributed.initialize("127.0.0.1:1", 1, 0) is False
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    assert distributed.initialize() is False
    monkeypatch.delenv(distributed.ENV_NUM_PROCESSES)
    for name, value in [("SLURM_JOB_ID", "7"), ("SLURM_STEP_NODELIST", "node1"),
                        ("SLURM_NTASKS", "1"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]:  # fmt: skip
        monkeypatch.setenv(name, value)
    assert distributed.initialize() is False  # a one-task SLURM step
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv(distributed.ENV_MODE, "off")
    assert distributed.initialize() is False  # switched off
    assert not jax.distributed.is_initialized()
    assert distributed.process_count() == 1 and distributed.process_index() == 0
    assert distributed.is_main_process() and not distributed.is_multiprocess()
    distributed.barrier("nothing to wait for")


def test_initialize_names_what_is_missing(monkeypatch):
    with pytest.raises(ValueError, match="num_processes, process_id not given"):
        distributed.initialize("127.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="FGLOC_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()
    assert not jax.distributed.is_initialized()


def test_process_rows_split_into_contiguous_blocks():
    blocks = [distributed.process_rows(7, p, 3) for p in range(3)]
    np.testing.assert_array_equal(np.concatenate(blocks), np.arange(7))
    assert [len(b) for b in blocks] == [3, 2, 2]
    np.testing.assert_array_equal(distributed.process_rows(5), np.arange(5))
    with pytest.raises(ValueError, match="process_index"):
        distributed.process_rows(5, 3, 3)


def test_map_rows_equals_the_batched_function_on_four_devices():
    rows = np.array([11, 4, 7, 2, 9])
    cols = np.array([0, 3])

    def load(ids):
        return {"row": ids, "col": np.broadcast_to(cols, (len(ids), len(cols)))}

    out = distributed.map_rows(W.cell_value, rows, load, batch_size=3)  # 4 devices: padding
    np.testing.assert_allclose(out, np.asarray(W.cell_value(load(rows))), rtol=1e-6)
    tree = distributed.map_rows(lambda b: {"r": b["row"] * 2}, rows, load, batch_size=8)
    np.testing.assert_array_equal(tree["r"], rows * 2)


def test_process_batches_give_each_process_its_slice_of_every_global_batch():
    import grain

    read: list[int] = []

    def fetch(i):
        read.append(int(i))
        return {"i": np.int64(i)}

    ds = grain.MapDataset.range(20).seed(1).shuffle().map(fetch)
    (whole,) = [list(train.process_batches(ds, 6, process_index=0, process_count=1))]
    read.clear()
    parts = [list(train.process_batches(ds, 6, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 3  # 20 // 6; the rest is dropped
    for k in range(3):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][k]["i"], parts[1][k]["i"]]), whole[k]["i"]
        )
    assert sorted(read) == sorted(np.concatenate([b["i"] for b in whole]).tolist())  # once each
    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        train.process_batches(ds, 6, process_index=0, process_count=4)


def test_array_batches_augmentation_does_not_depend_on_the_process_count():
    one = W.batches(0, 1)
    two = [W.batches(p, 2) for p in (0, 1)]
    for _ in range(5):  # epochs of 12 examples wrap inside batch 2
        g = next(one)
        a, b = next(two[0]), next(two[1])
        np.testing.assert_array_equal(np.concatenate([a["x"], b["x"]]), g["x"])
    assert two[0].get_state() == two[1].get_state() == one.get_state()


def test_cached_cells_reads_and_folds_the_files_of_several_processes(tmp_path):
    """A single process merges per-process files (written here as two processes would)."""
    path = tmp_path / "c.cells.npz"
    key = {"k": 1}
    calls: list[int] = []
    cached_cells(path, key, [0, 1, 2, 3], [5], lambda r, c: W.cell_compute(r, c, calls))
    for p, rows in enumerate([[4, 5], [6]]):  # "process p" filled these rows
        vals = np.asarray(W.cell_compute(np.array(rows), np.array([5])))
        save_npz(
            path.with_name(f"c.cells.proc{p}.npz"),
            {"__key__": digest(key), "rows": np.array(rows), "cols": np.array([5]),
             "values": vals, "have": np.ones((len(rows), 1), bool)},
        )  # fmt: skip
    save_npz(path.with_name("c.cells.proc2.npz"), {"__key__": digest({"k": 2}), "rows": [9]})
    calls.clear()
    out = cached_cells(path, key, range(8), [5], lambda r, c: W.cell_compute(r, c, calls))
    assert calls == [7]  # only row 7 was new
    np.testing.assert_allclose(out, W.cell_compute(np.arange(8), np.array([5])), rtol=1e-6)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.cells.npz"]  # folded


# --- two processes ------------------------------------------------------------------------


def _fit(num_steps: int, ck=None):
    _, params = W.problem()
    mesh = train.data_mesh(4)
    if "step" not in _STEP:  # one compiled step for every run of this module
        _STEP["step"] = train.make_train_step(W.loss, W.tx(), mesh)
    return train.fit(
        train.create_train_state(params, W.tx()), _STEP["step"], W.batches(), mesh=mesh,
        num_steps=num_steps, rng=jax.random.key(7), checkpointer=ck, progress=False,
    )  # fmt: skip


_STEP: dict = {}


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run on one process x four devices: (state, history)."""
    return _fit(W.NUM_STEPS)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One run of two worker processes (mode "run"), with rows of the cell cache pre-filled by
    this process and a one-process checkpoint to resume from. It ends with process 1 killing
    itself and process 0 failing."""
    out = tmp_path_factory.mktemp("two_processes")
    with train.Checkpointer(out / "ckpt1") as ck:  # for the worker to resume in two processes
        _fit(W.ONE_PROCESS_STEP, ck)
    pre: list[int] = []
    cached_cells(
        out / "cache" / "cells.npz", {"k": 1}, W.PRECACHED_ROWS, W.CELL_COLS,
        lambda r, c: W.cell_compute(r, c, pre), chunk=2,
    )  # fmt: skip
    codes, logs = _launch("run", out, timeout=240)  # heartbeat timeout 5 s in the worker
    for p in (0, 1):
        assert (out / f"train-{p}.npz").is_file(), logs[p][-3000:]
    return out, [dict(np.load(out / f"train-{p}.npz")) for p in (0, 1)], logs, codes


# The tests below share one run of two worker processes (about 60 s of CPU on 2 cores).
two_process = pytest.mark.slow


def _leaves(result: dict, prefix: str = "leaf") -> list[np.ndarray]:
    return [result[f"{prefix}{i}"] for i in range(len([k for k in result if k.startswith(prefix)]))]


@two_process
def test_two_processes_train_like_one_process_with_four_devices(two_processes, reference):
    _, results, _, _ = two_processes
    for a, b in zip(_leaves(results[0]), _leaves(results[1]), strict=True):
        np.testing.assert_array_equal(a, b)  # both processes hold the same state
    ref, hist = reference
    ref_leaves = [np.asarray(v) for v in jax.tree.leaves(ref)]
    assert int(ref.step) == W.NUM_STEPS == int(results[0]["leaf0"])
    for got, want in zip(_leaves(results[0]), ref_leaves, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(results[0]["losses"], [h["loss"] for h in hist], rtol=2e-5)


@two_process
def test_sigterm_in_one_process_stops_both_at_the_same_saved_step(two_processes):
    _, results, logs, _ = two_processes
    stopped = int(results[0]["stopped"])
    assert int(results[1]["stopped"]) == stopped
    assert 3 <= stopped < W.NUM_STEPS, "the preemption was not honoured before the end"
    assert int(results[0]["n_first"]) == stopped
    assert int(results[0]["n_rest"]) == W.NUM_STEPS - stopped
    assert stopped in results[0]["steps"] and W.NUM_STEPS in results[0]["steps"]
    assert "SIGTERM received; saved a checkpoint at step" in logs[0]
    assert "SIGTERM received" not in logs[1]  # logged by process 0 only


@two_process
def test_checkpoint_of_two_processes_resumes_in_one_process(two_processes, reference, tmp_path):
    out, results, _, _ = two_processes
    stopped = int(results[0]["stopped"])
    shutil.copytree(out / "ckpt" / str(stopped), tmp_path / "ck" / str(stopped))
    with train.Checkpointer(tmp_path / "ck") as ck:
        assert ck.all_steps() == [stopped]
        assert ck.restore_data_state() == {"next_index": stopped}
        resumed, hist = _fit(W.NUM_STEPS, ck=ck)
    assert len(hist) == W.NUM_STEPS - stopped
    ref, _ = reference
    for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)


@two_process
def test_checkpoint_of_one_process_resumes_in_two_processes(two_processes, reference):
    _, results, _, _ = two_processes
    ref, _ = reference
    got = _leaves(results[0], "from1-")
    assert int(got[0]) == W.NUM_STEPS
    for a, b in zip(got, _leaves(results[1], "from1-"), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, want in zip(got, jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, np.asarray(want), rtol=2e-5, atol=1e-6)


@two_process
def test_cell_cache_filled_by_two_processes_equals_one_process(two_processes, tmp_path):
    out, _, _, _ = two_processes
    cells = [dict(np.load(out / f"cells-{p}.npz")) for p in (0, 1)]
    want = np.asarray(W.cell_compute(W.CELL_ROWS, W.CELL_COLS))
    for c in cells:
        np.testing.assert_allclose(c["values"], want, rtol=1e-6)  # every process has all rows
    for c in cells:  # map_rows across processes: all rows, in order, on every process
        np.testing.assert_allclose(c["mapped"], want, rtol=1e-6)
    a, b = (set(c["loaded"].tolist()) for c in cells)
    assert a and b and not a & b and sorted(a | b) == W.CELL_ROWS.tolist()  # own rows only
    new = sorted(set(W.CELL_ROWS.tolist()) - set(W.PRECACHED_ROWS.tolist()))
    a, b = (set(c["computed"].tolist()) for c in cells)
    assert a and b and not a & b and sorted(a | b) == new  # split, each row computed once
    # One process reads what two wrote (computing nothing) and gets the one-process cache.
    path = tmp_path / "cells.npz"
    shutil.copytree(out / "cache", tmp_path, dirs_exist_ok=True)
    assert {f.name for f in tmp_path.iterdir()} >= {"cells.proc0.npz", "cells.proc1.npz"}

    def fail(rows, cols):
        raise AssertionError(f"recomputed rows {rows}")

    got = cached_cells(path, {"k": 1}, W.CELL_ROWS, W.CELL_COLS, fail)
    single = cached_cells(tmp_path / "one.npz", {"k": 1}, W.CELL_ROWS, W.CELL_COLS, W.cell_compute)  # fmt: skip
    np.testing.assert_array_equal(got, single)


@two_process
def test_a_dead_process_makes_the_other_fail_with_a_clear_error(two_processes):
    _, _, logs, codes = two_processes  # _launch fails the test if a process hangs
    assert "now training until process 1 dies" in logs[1]
    assert codes[1] == -9  # SIGKILL
    assert codes[0] != 0
    assert (
        "PeerFailureError" in logs[0] and "another process has probably stopped" in logs[0]
    ) or "another task died" in logs[0], logs[0][-3000:]
