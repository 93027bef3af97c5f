"""Strict test environment (house style, after equinox's conftest).

* 4 virtual CPU devices, so sharding / data-parallel code runs on CPU;
* a fresh ``FGLOC_CACHE`` (converted weights) and XLA compilation cache per run, shared by the
  xdist workers and the subprocesses;
* implicit rank promotion raises;
* warnings are errors unless filtered in pyproject.toml with a reason;
* skips cannot hide failures in CI (issue 13). Under ``CI=true`` a test whose cause for skipping
  is something CI is meant to have -- ``../shared/data``, torch / torchvision and the other
  ``parity`` / ``torchvision`` extras that ``scripts/test.sh`` installs -- FAILS instead
  (`require_module`, `require_path`, `missing`); the only skip CI allows is an optional extra it
  does not install (`optional_module`: OpenCV and the other ``peers``). A skip on an import
  error of the project's own modules fails everywhere. `pytest_runtest_makereport` and
  `pytest_make_collect_report` enforce both rules on every skip, however it was raised
  (``pytest.skip``, ``pytest.importorskip``, a skip mark), so a new bare skip cannot slip through.

Tests import the helpers with ``from conftest import require_module`` (pytest puts ``tests/`` on
``sys.path``).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import tempfile
from types import ModuleType
from typing import Any, NoReturn

#: 4 virtual CPU devices. (LLVM at -O0 was tried: the compile-bound tests gained what the
#: compute-bound ones lost, 2026-12-02.)
TEST_XLA_FLAGS = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)


# One fresh directory per test run, shared by its xdist workers (they share the run's
# ``PYTEST_XDIST_TESTRUNUID``) and inherited by the subprocesses the tests start.
os.environ.setdefault(
    "FGLOC_TEST_RUN_DIR",
    os.path.join(tempfile.gettempdir(), f"fgloc-test-run-{os.environ['PYTEST_XDIST_TESTRUNUID']}")
    if os.environ.get("PYTEST_XDIST_TESTRUNUID")
    else tempfile.mkdtemp(prefix="fgloc-test-run-"),
)
os.makedirs(os.environ["FGLOC_TEST_RUN_DIR"], exist_ok=True)
# A fresh converted-weight cache per test run (inherited by subprocesses), so a test never
# reads a conversion made by older code (issue 13, defect 3); cache writes are atomic
# (`fgloc.cache.save_npz`), so the workers fill it together and each weight converts once.
os.environ["FGLOC_CACHE"] = os.path.join(os.environ["FGLOC_TEST_RUN_DIR"], "fgloc-cache")
# A fresh persistent XLA compilation cache per run, likewise shared: the same program built by
# two tests, two workers or a CLI subprocess compiles once (about half of a smoke experiment's
# time is compilation). Its key covers the program, the XLA flags and the jax version.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
    os.environ["FGLOC_TEST_RUN_DIR"], "xla-cache"
)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.05"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (after the environment above, which jax reads at import)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
# the same settings in this process, in case a plugin imported jax before the lines above ran
for _var, _type in (
    ("JAX_COMPILATION_CACHE_DIR", str),
    ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", float),
    ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", int),
):
    jax.config.update(_var.lower(), _type(os.environ[_var]))

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: ``CI=true`` (GitHub Actions, GitLab, ... set it; ``1`` / ``yes`` are accepted too).
CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}
#: The project's own top-level packages: an import error of one of them is never a skip.
PROJECT_PACKAGES = ("fgloc", "weights_conversion", "experiments")
#: Import name -> the pyproject extra that provides it, for the extras CI does not install.
OPTIONAL_MODULES = {
    "cv2": "peers",
    "torchcam": "peers",
    "captum": "peers",
    "pytorch_grad_cam": "peers",
}
#: Every allowed skip's message starts with this (see `optional_module`).
OPTIONAL_SKIP = "optional extra not installed"
_PROJECT_IMPORT_SKIP = re.compile(
    r"could not import '(?:" + "|".join(PROJECT_PACKAGES) + r")(?:\.|')"
)


def missing(reason: str) -> NoReturn:
    """Skip the calling test (or module) -- but fail it under ``CI=true``.

    For a cause CI is meant not to have: real data, a parity / torchvision extra.
    """
    __tracebackhide__ = True  # report the caller's line
    if CI:
        pytest.fail(f"CI=true and {reason}: CI must provide it (a skip would hide the test)")
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, hint: str = "") -> ModuleType:
    """`pytest.importorskip` that fails under ``CI=true``; the project's modules never skip.

    Args:
      name: a module CI installs (``torch``, ``torchvision``, ``efficientnet_lite_pytorch``).
      hint: appended to the message (e.g. ``"pip install '.[parity]'"``).
    """
    __tracebackhide__ = True  # report the caller's line
    if name.split(".")[0] in PROJECT_PACKAGES:
        return importlib.import_module(name)  # an error here is a failure, not a skip
    try:
        return importlib.import_module(name)
    except ImportError as err:
        missing(f"{name} is not importable ({err}){f'; {hint}' if hint else ''}")


def optional_module(name: str) -> ModuleType:
    """Import an optional-extra module CI does not install (`OPTIONAL_MODULES`), else skip.

    The one skip allowed under ``CI=true``. A name not in `OPTIONAL_MODULES` is a ``KeyError``:
    declare it there (with its extra) or use `require_module`.
    """
    __tracebackhide__ = True  # report the caller's line
    extra = OPTIONAL_MODULES[name]
    try:
        return importlib.import_module(name)
    except ImportError as err:
        pytest.skip(f"{OPTIONAL_SKIP}: {name} (pip install '.[{extra}]'): {err}")


def require_path(path: pathlib.Path) -> pathlib.Path:
    """``path`` if it exists; else skip (fail under ``CI=true``, which has ../shared/data)."""
    __tracebackhide__ = True  # report the caller's line
    if not path.exists():
        missing(f"{path} not found (real data: ../shared/data beside the clone)")
    return path


@pytest.fixture
def train_step_hook(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``install(before)``: the steps that `fgloc.train.trainer.make_train_step` builds from
    then on first call ``before(n)`` (``n`` = 1, 2, ... counted over the install), e.g. to send
    SIGTERM or raise at a given step; ``install(None)`` restores the real one."""
    from fgloc.train import trainer

    real = trainer.make_train_step

    def install(before: Any) -> None:
        if before is None:
            monkeypatch.setattr(trainer, "make_train_step", real)
            return
        calls = {"n": 0}

        def make(loss_fn: Any, tx: Any, mesh: Any) -> Any:
            step = real(loss_fn, tx, mesh)

            def wrapped(state: Any, batch: Any, rng: Any) -> Any:
                calls["n"] += 1
                before(calls["n"])
                return step(state, batch, rng)

            return wrapped

        monkeypatch.setattr(trainer, "make_train_step", make)

    return install


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data` beside the clone; skips when absent (a fresh clone), fails under CI."""
    return require_path(SHARED_DATA)


@pytest.fixture(scope="session")
def cub_dir(shared_data: pathlib.Path) -> pathlib.Path:
    return require_path(shared_data / "CUB_200_2011")


@pytest.fixture(scope="session")
def imagenet_dir(shared_data: pathlib.Path) -> pathlib.Path:
    return require_path(shared_data / "imagenet_val_sample")


# --------------------------------------------------------------------------- the skip policy


def _skip_message(report: Any) -> str:
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(message).removeprefix("Skipped: ")


def _disallowed_skip(report: Any) -> str | None:
    """Why ``report``'s skip must be a failure here, or ``None`` if it may stay a skip."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    message = _skip_message(report)
    if _PROJECT_IMPORT_SKIP.search(message):
        return f"an import error of the project's own code is never a skip: {message}"
    if CI and not message.startswith(OPTIONAL_SKIP):
        return (
            f"CI=true: this skip's cause is something CI must provide: {message} (the one "
            f"skip allowed under CI is conftest.optional_module's '{OPTIONAL_SKIP}')"
        )
    return None


def _enforce(report: Any) -> None:
    why = _disallowed_skip(report)
    if why is not None:
        report.outcome = "failed"
        report.longrepr = why


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    _enforce(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _enforce(outcome.get_result())
