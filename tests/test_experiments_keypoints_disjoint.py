"""The class-disjoint smoke run of experiments/keypoint_fcn_cub.py (issue 18).

Its own file so that the test runner's second worker can take it while the first runs the other
keypoint smoke runs (`scripts/test.sh` hands out one file per worker).
"""

from __future__ import annotations

import json

import pytest
from test_experiments_keypoints import KEYS, _run  # one run helper, one key list

from fgloc.data import cub


@pytest.mark.slow
@pytest.mark.real_data
def test_class_disjoint_smoke_run(shared_data, tmp_path):
    m = _run("class_disjoint_smoke", shared_data, tmp_path, "--config.report_classes=score")
    d = "disjoint."
    for k in KEYS:
        if k != "seconds":
            assert d + k in m, k
    assert not any(k in m for k in ("pck@0.10", "cls_acc_joint"))  # every key prefixed
    assert 0 <= m[d + "cls_part_threshold"] <= 1
    for r in ("argmax", "soft_argmax+flip", "dark+flip"):
        assert 0 <= m[f"{d}design.{r}.pck@0.10"] <= 1
    assert m[d + "design.best_decoder_pck@0.05"] in {
        k.split(".")[2] for k in m if k.startswith(d + "design.") and k.endswith("pck@0.05")
    }
    assert m[d + "design.n_images"] == 16
    # every evaluation image is a score-class image: the report on those classes is the same
    assert m[d + "score_classes.n_images"] == m[d + "n_images"]
    for k in ("pck@0.10", "pcp_head", "cls_acc_joint", "ablation.floor.pck@0.05"):
        assert m[f"{d}score_classes.{k}"] == m[d + k], k
    # no score-class image reaches the design steps, no design-class image training or scoring
    roles = json.loads((tmp_path / "images.json").read_text())
    assert set(roles["train"]["classes"]) <= set(cub.SCORE_CLASSES)
    assert set(roles["eval"]["classes"]) <= set(cub.SCORE_CLASSES)
    assert set(roles["design"]["classes"]) <= set(cub.DESIGN_CLASSES)
    assert m[d + "n_classes"] == len(set(roles["train"]["classes"]))
    files = {r: set(v["files"]) for r, v in roles.items()}
    assert not files["design"] & (files["train"] | files["eval"])
    for p in (tmp_path / "stages").glob("*/stage.json"):
        text = p.read_text()
        assert not any(f in text for f in files["design"]), p.parent.name
