"""Smoke test of `experiments.benchmark_scaling` (issue 16): ``--smoke`` run as a user runs it,
in a subprocess; the JSON is checked for its structure and for numbers that are positive and
consistent (no speed targets asserted)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # four fresh JAX processes (1 x 1, 1 x 2, 2 x 1), each compiling its steps
def test_smoke_run_writes_all_configurations(tmp_path):
    out = tmp_path / "scaling.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "experiments.benchmark_scaling", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True
    assert {"platform", "cpu_count", "jax", "device"} <= set(result["machine"])
    configs, s = result["configs"], result["settings"]
    assert set(configs) == {"1x1", "1x2", "2x1"}
    for name, (procs, devices) in {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}.items():
        c = configs[name]
        assert (c["processes"], c["devices_per_process"]) == (procs, devices)
        assert c["global_devices"] == procs * devices
        assert len(c["process_cpu_s"]) == s["rounds"] == 1 and len(c["process_cpu_s"][0]) == procs
        assert c["final_step"] == s["warmup_steps"] + s["steps"]
        for key in ("train_images_per_s", "map_images_per_s", "train_step_ms", "allreduce_ms"):
            assert c[key] > 0 and c[f"{key}_rounds"] == [c[key]], (name, key)
        assert c["train_images_per_s"] * c["train_step_ms"] / 1e3 == pytest.approx(s["batch_size"])  # fmt: skip
    assert result["summary"]["cross_process_allreduce_ms"] == configs["2x1"]["allreduce_ms"]
    assert "summary" in json.loads(proc.stdout)
