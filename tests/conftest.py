"""Strict test environment (house style, after equinox's conftest).

* 4 virtual CPU devices, so sharding / data-parallel code runs on CPU;
* a fresh ``FGLOC_CACHE`` (converted weights) per session;
* implicit rank promotion raises;
* warnings are errors unless filtered in pyproject.toml with a reason.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# A fresh converted-weight cache per test session (inherited by subprocesses), so a test never
# reads a conversion made by older code (issue 13, defect 3).
os.environ["FGLOC_CACHE"] = tempfile.mkdtemp(prefix="fgloc-test-cache-")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """`../shared/data` beside the clone; skips the test cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (only present in CI and dev checkouts)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cub_dir(shared_data: pathlib.Path) -> pathlib.Path:
    path = shared_data / "CUB_200_2011"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def imagenet_dir(shared_data: pathlib.Path) -> pathlib.Path:
    path = shared_data / "imagenet_val_sample"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path
