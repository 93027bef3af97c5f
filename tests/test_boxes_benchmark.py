"""Smoke test of `experiments.benchmark_boxes` (issue 17): synthetic maps, tiny, numbers checked.

Speed is read from the output, never asserted. OpenCV is optional (without it the scipy loop is
the peer); the boxes of every contender must equal `map_boxes`' on every map.
"""

from __future__ import annotations

import json

import numpy as np

from experiments import benchmark_boxes as bb


def test_smoke_run_writes_identical_boxes_and_a_plot(tmp_path) -> None:
    out = tmp_path / "boxes.json"
    results = bb.main(["--out", str(out), "--smoke"])
    saved = json.loads(out.read_text())
    assert saved["summary"] == results["summary"]
    assert set(saved["pairs"]) == {"boxes_16x16_b4", "boxes_7x7_b4"}
    for entry in saved["pairs"].values():
        assert set(entry["same_box_fraction_vs_map_boxes"].values()) == {1.0}
        assert {"fgloc", "fgloc_pixel", "scipy_ndimage_loop", "floor_max_pass"} <= set(
            entry["timing"]
        )
        assert entry["run_path"] is True  # smooth upsampled maps: few runs per column
        assert entry["label_steps"] >= 1
        assert all(t["throughput_per_s"] > 0 for t in entry["timing"].values())
    s = saved["summary"]
    assert s["all_boxes_identical"] is True
    assert s["boxes_pair"] == "boxes_16x16_b4"
    assert s["against"] in ("opencv_loop", "scipy_ndimage_loop")
    assert np.isclose(
        s["boxes_speedup_b256"],
        saved["pairs"]["boxes_16x16_b4"]["timing"]["fgloc"]["throughput_per_s"]
        / saved["pairs"]["boxes_16x16_b4"]["timing"][s["against"]]["throughput_per_s"],
        rtol=1e-2,
    )
    assert out.with_suffix(".png").stat().st_size > 0
    assert "boxes_speedup_b256" in out.with_suffix(".md").read_text()


def test_reference_boxes_hand_case() -> None:
    maps = np.zeros((2, 5, 6), np.float32)
    maps[0, 1:3, 2:5] = 1.0
    maps[0, 4, 0] = 0.9
    np.testing.assert_array_equal(bb.reference_boxes(maps, 0.5, 4), [[2, 1, 5, 3], [0, 0, 6, 5]])
