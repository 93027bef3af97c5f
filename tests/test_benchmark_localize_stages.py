"""Smoke test of `experiments.benchmark_localize_stages` (issue 17): 3 photos at 64 px, one
batch-padding case; the stage times are read, never asserted against a speed."""

from __future__ import annotations

import json

import pytest

from experiments import benchmark_localize_stages as bls


def test_smoke_run_writes_every_stage_of_every_pass(tmp_path) -> None:
    out = tmp_path / "stages.json"
    res = bls.main(["--out", str(out), "--photos", "3", "--size", "64", "--batch", "2"])
    saved = json.loads(out.read_text())
    assert saved["passes"] == res["passes"] and len(saved["passes"]) == 2
    assert saved["photos"] == 3 and saved["input_size"] == 64 and saved["batch"] == 2
    for p in saved["passes"]:
        assert set(p) == {"decode", "resize", "batch_call", "forward_only"}
        assert all(v >= 0 for v in p.values()) and p["batch_call"] > 0
    assert saved["warm_forward_fraction_of_batch_call"] > 0


def test_impossible_options_name_them(tmp_path) -> None:
    with pytest.raises(SystemExit):
        bls.main(["--out", str(tmp_path / "x.json"), "--size", "16"])
