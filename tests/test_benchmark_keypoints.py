"""Smoke test of `experiments.benchmark_keypoints`: the seconds-long config as a subprocess, the
JSON it writes, the loop baseline and the peak-RSS probe. No timing is asserted."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark_keypoints as bk
from fgloc.localize.coordinate_transfer import coordinate_transfer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_run_writes_json(tmp_path) -> None:
    out = tmp_path / "tmp.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.benchmark_keypoints", "--smoke", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["machine"]["cpu_count"] >= 1 and r["machine"]["jax_backend"]
    ct = r["coordinate_transfer"]
    assert ct["numbers_match_loop"] is True
    for k in ("gather_forward_s", "gather_forward_backward_s", "python_loop_forward_s"):
        assert ct[k] > 0
    assert set(r["bilinear"]) == set(bk.METHODS)
    for method, e in r["bilinear"].items():
        assert e["forward_s"] > 0 and e["forward_backward_s"] > 0
        assert e["output_dim"] == (16 * 16 if method == "full" else 64)
        assert set(e["forward_memory"]) <= {"argument_bytes", "output_bytes", "temp_bytes"}
        if method != "full":
            assert 0 <= e["kernel_rel_error"] < 2.0
    assert r["total_seconds"] > 0


def test_loop_baseline_equals_gather() -> None:
    cfg = bk.get_config(smoke=True)
    data = bk._inputs(cfg)
    f = jnp.asarray(data["features"])
    a = bk.loop_coordinate_transfer(f, data["cells"], data["visible"], 3)
    b = coordinate_transfer(f, data["cells"], data["visible"], 3)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_rss_probe_in_process() -> None:
    cfg = bk.get_config(smoke=True)
    r = bk.rss_probe(cfg, "ts_segment")
    assert set(r) == {"forward_peak_rss_mib", "forward_backward_peak_rss_mib"}
    assert all(np.isfinite(v) for v in r.values())
