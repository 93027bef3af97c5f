"""fgloc.train: data-parallel step == single-device step == analytic SGD; orbax round trip;
resume and preemption (SIGTERM). Several processes: tests/test_distributed.py."""

from __future__ import annotations

import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgloc.train import checkpoints, trainer


def _linreg_loss(params, frozen, batch, rng):
    """Mean squared error of a linear model; ``frozen["scale"]`` multiplies the prediction."""
    del rng
    pred = frozen["scale"] * (batch["x"] @ params["w"]) + params["b"]
    err = pred - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def _problem(n=8, d=3, seed=0):
    rs = np.random.default_rng(seed)
    x = rs.normal(size=(n, d)).astype(np.float32)
    y = rs.normal(size=(n,)).astype(np.float32)
    params = {"w": rs.normal(size=(d,)).astype(np.float32), "b": np.float32(0.3)}
    return x, y, params


@pytest.mark.parametrize("n_devices", [1, 4])
def test_step_matches_analytic_sgd(n_devices):
    x, y, params = _problem()
    lr, scale = 0.1, 2.0
    tx = optax.sgd(lr)
    mesh = trainer.data_mesh(n_devices)
    state = trainer.replicate(
        trainer.create_train_state(params, tx, frozen={"scale": np.float32(scale)}), mesh
    )
    step = trainer.make_train_step(_linreg_loss, tx, mesh)
    new, metrics = step(state, trainer.shard_batch({"x": x, "y": y}, mesh), jax.random.key(0))
    # d/dw mean((s x·w + b - y)^2) = 2 s X^T r / N ; d/db = 2 mean(r)
    r = scale * x @ params["w"] + params["b"] - y
    w_ref = params["w"] - lr * 2 * scale * x.T @ r / len(y)
    b_ref = params["b"] - lr * 2 * r.mean()
    np.testing.assert_allclose(new.params["w"], w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.params["b"], b_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], np.mean(r**2), rtol=1e-5)
    np.testing.assert_allclose(metrics["mae"], np.mean(np.abs(r)), rtol=1e-5)
    assert int(new.step) == 1
    assert new.params["w"].sharding.is_fully_replicated


def test_data_parallel_equals_single_device_with_adam():
    assert jax.local_device_count() >= 4, "conftest should give 4 CPU devices"
    x, y, params = _problem(n=16)
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    results = []
    for n in (1, 4):
        mesh = trainer.data_mesh(n)
        state = trainer.replicate(
            trainer.create_train_state(params, tx, frozen={"scale": np.float32(1.0)}), mesh
        )
        step = trainer.make_train_step(_linreg_loss, tx, mesh)
        for i in range(3):
            sl = slice(0, 16) if i % 2 == 0 else slice(8, 16)
            batch = trainer.shard_batch({"x": x[sl], "y": y[sl]}, mesh)
            state, _ = step(state, batch, jax.random.key(i))
        results.append(jax.device_get(state.params))
    np.testing.assert_allclose(results[0]["w"], results[1]["w"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results[0]["b"], results[1]["b"], rtol=1e-6, atol=1e-7)


def test_shard_batch_rejects_indivisible_batch():
    mesh = trainer.data_mesh(4)
    with pytest.raises(ValueError, match=r"batch\['x'\].*divisible by the 4 devices"):
        trainer.shard_batch({"x": np.zeros((6, 2))}, mesh)


def test_array_batches_cover_each_epoch_once():
    arrays = {"i": np.arange(12), "sq": np.arange(12) ** 2}
    it = trainer.array_batches(arrays, 4, seed=3, num_epochs=2)
    batches = list(it)
    assert len(batches) == 6
    for b in batches:
        np.testing.assert_array_equal(b["sq"], b["i"] ** 2)  # fields stay aligned
    first = np.sort(np.concatenate([b["i"] for b in batches[:3]]))
    second = np.sort(np.concatenate([b["i"] for b in batches[3:]]))
    np.testing.assert_array_equal(first, np.arange(12))
    np.testing.assert_array_equal(second, np.arange(12))
    with pytest.raises(ValueError, match="equal lengths"):
        trainer.array_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2)


def test_checkpoint_round_trip_and_resume(tmp_path):
    x, y, params = _problem()
    tx = optax.adam(1e-2)
    mesh = trainer.data_mesh(4)
    step = trainer.make_train_step(_linreg_loss, tx, mesh)
    frozen = {"scale": np.float32(1.0)}

    def batches():
        while True:
            yield {"x": x, "y": y}

    # 4 steps straight through.
    ref, _ = trainer.fit(
        trainer.create_train_state(params, tx, frozen),
        step,
        batches(),
        mesh=mesh,
        num_steps=4,
        rng=jax.random.key(0),
        progress=False,
    )
    # 2 steps, checkpoint, then a fresh process-like resume to 4.
    with checkpoints.Checkpointer(tmp_path / "ckpt") as ck:
        mid, _ = trainer.fit(
            trainer.create_train_state(params, tx, frozen),
            step,
            batches(),
            mesh=mesh,
            num_steps=2,
            rng=jax.random.key(0),
            checkpointer=ck,
            progress=False,
        )
        assert ck.all_steps() == [2]
        restored = ck.restore(trainer.create_train_state(params, tx, frozen))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(mid), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        resumed, hist = trainer.fit(
            trainer.create_train_state(params, tx, frozen),
            step,
            batches(),
            mesh=mesh,
            num_steps=4,
            rng=jax.random.key(0),
            checkpointer=ck,
            progress=False,
        )
        assert len(hist) == 2  # only steps 3 and 4 ran
        assert ck.latest_step() == 4
    np.testing.assert_allclose(resumed.params["w"], ref.params["w"], rtol=1e-6)
    assert int(resumed.step) == 4


def test_mismatched_checkpoint_gives_clear_error(tmp_path):
    _, _, params = _problem(d=3)
    tx = optax.sgd(0.1)
    with checkpoints.Checkpointer(tmp_path) as ck:
        ck.save(1, trainer.create_train_state(params, tx))
        other = {"w": np.zeros(5, np.float32), "bias": np.float32(0)}
        with pytest.raises(checkpoints.CheckpointMismatchError) as err:
            ck.restore(trainer.create_train_state(other, tx))
        msg = str(err.value)
        assert "params/w: saved (3,) vs expected (5,)" in msg
        assert "params/bias" in msg and "params/b" in msg
        with pytest.raises(FileNotFoundError, match="step 7"):
            ck.restore(trainer.create_train_state(params, tx), step=7)
    with (
        checkpoints.Checkpointer(tmp_path / "empty") as ck,
        pytest.raises(FileNotFoundError, match="no checkpoint"),
    ):
        ck.restore({"a": np.zeros(2)})


def _dropout_loss(params, frozen, batch, rng):
    """Linear regression with input dropout driven by the step's rng (so the rng matters)."""
    del frozen
    keep = jax.random.bernoulli(rng, 0.7, batch["x"].shape)
    x = jnp.where(keep, batch["x"] / 0.7, 0.0)
    err = x @ params["w"] + params["b"] - batch["y"]
    return jnp.mean(err**2), {}


def _jitter(example, rng):
    """Per-example augmentation from grain's per-record generator."""
    return {**example, "x": example["x"] + rng.normal(size=example["x"].shape).astype(np.float32)}


def _all_leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


class _DropoutRun:
    """Shuffled (10 examples, batch 4: epochs wrap mid-run), per-example augmented batches and a
    loss that uses the step's rng, on 4 devices; one compiled step for every test using it."""

    def __init__(self) -> None:
        rs = np.random.default_rng(0)
        self.arrays = {
            "x": rs.normal(size=(10, 3)).astype(np.float32),
            "y": rs.normal(size=(10,)).astype(np.float32),
        }
        self.params = {"w": np.zeros(3, np.float32), "b": np.float32(0.0)}
        self.tx = optax.adam(5e-2)
        self.mesh = trainer.data_mesh(4)
        self.step = trainer.make_train_step(_dropout_loss, self.tx, self.mesh)

    def batches(self):
        return trainer.array_batches(self.arrays, 4, seed=3, transform=_jitter)

    def __call__(self, num_steps, ck=None, every=0, batches=None):
        return trainer.fit(
            trainer.create_train_state(self.params, self.tx),
            self.step,
            self.batches() if batches is None else batches,
            mesh=self.mesh,
            num_steps=num_steps,
            rng=jax.random.key(7),
            checkpointer=ck,
            checkpoint_every=every,
            progress=False,
        )


@pytest.fixture(scope="module")
def dropout_run():
    run = _DropoutRun()
    return run, run(9)  # the uninterrupted run: (state, history)


def test_resumed_run_is_the_uninterrupted_run_on_shuffled_augmented_batches(tmp_path, dropout_run):
    """Issue 13 defect 2: a run interrupted after 5 steps and resumed (a new Checkpointer, a
    new iterator, as a new process would) ends with every leaf of the state — params, Adam
    moments, step — equal to the uninterrupted run. Batches are shuffled each epoch (10
    examples, batch 4, so epochs wrap mid-run), augmented per example, and the loss uses the
    step's rng. Restarting the iterator from the beginning (the old behaviour) replays epoch 0's
    first batches and fails this test."""
    run, (ref, ref_hist) = dropout_run
    with checkpoints.Checkpointer(tmp_path / "ck") as ck:
        run(5, ck)
    with checkpoints.Checkpointer(tmp_path / "ck") as ck:
        assert ck.restore_data_state() is not None  # the iterator position was saved
        resumed, hist = run(9, ck)
    assert len(hist) == 4
    _all_leaves_equal(resumed, ref)
    np.testing.assert_array_equal([h["loss"] for h in hist], [h["loss"] for h in ref_hist[5:]])


def test_resume_of_a_plain_iterable_skips_the_consumed_batches(tmp_path):
    """Iterables without grain's get_state/set_state are advanced past the batches consumed."""
    rs = np.random.default_rng(1)
    data = [
        {"x": rs.normal(size=(4, 3)).astype(np.float32), "y": rs.normal(size=4).astype(np.float32)}
        for _ in range(6)
    ]
    params = {"w": np.zeros(3, np.float32), "b": np.float32(0.0)}
    tx = optax.sgd(0.1)
    mesh = trainer.data_mesh(2)
    step = trainer.make_train_step(_dropout_loss, tx, mesh)
    fit = functools.partial(trainer.fit, mesh=mesh, rng=jax.random.key(0), progress=False)
    ref, _ = fit(trainer.create_train_state(params, tx), step, data, num_steps=6)
    with checkpoints.Checkpointer(tmp_path) as ck:
        fit(trainer.create_train_state(params, tx), step, data, num_steps=2, checkpointer=ck)
        out, _ = fit(trainer.create_train_state(params, tx), step, data, num_steps=6, checkpointer=ck)  # fmt: skip
    _all_leaves_equal(out, ref)


class _SigtermAt:
    """Batches that send SIGTERM to this process when the `at`-th batch is drawn, recording
    the SIGTERM handler in place at each draw; keeps grain's position API."""

    def __init__(self, it, at):
        self.it, self.at, self.n, self.handlers = it, at, 0, []

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        self.handlers.append(signal.getsignal(signal.SIGTERM))
        if self.n == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def test_sigterm_saves_at_the_next_step_returns_and_resumes_to_the_same_result(
    tmp_path, caplog, dropout_run
):
    """Issue 16 (preemption): SIGTERM while batch 3 is drawn -> step 3 finishes, a checkpoint
    is saved at step 3 and `fit` returns normally; a second `fit` ends equal to the
    uninterrupted run. The handler is installed only with a checkpointer, and restored."""
    run, (ref, _) = dropout_run
    before = signal.getsignal(signal.SIGTERM)
    plain = _SigtermAt(run.batches(), at=0)
    run(2, batches=plain)
    assert plain.handlers == [before, before]  # no checkpointer: SIGTERM left alone
    interrupted = _SigtermAt(run.batches(), at=3)
    with checkpoints.Checkpointer(tmp_path / "ck") as ck, caplog.at_level("WARNING"):
        early, hist = run(9, ck, batches=interrupted)
        assert int(early.step) == 3 and len(hist) == 3
        assert ck.all_steps() == [3]
    assert "SIGTERM received; saved a checkpoint at step 3 of 9" in caplog.text
    assert interrupted.handlers[0] is not before  # fit's handler was in place ...
    assert signal.getsignal(signal.SIGTERM) is before  # ... and is restored
    with checkpoints.Checkpointer(tmp_path / "ck") as ck:
        resumed, rest = run(9, ck)
        assert len(rest) == 6 and ck.latest_step() == 9
    _all_leaves_equal(resumed, ref)
