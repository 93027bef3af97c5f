"""Tests for experiments/part_discovery_cub.py (paper 1 on CUB): helpers and a real-data smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import part_discovery_cub as E


def test_configs_and_candidate_parsing():
    default, smoke = E.get_config(), E.get_config("smoke")
    assert default.paper_candidate in default.candidates
    assert smoke.paper_candidate in smoke.candidates
    assert E._parse_candidate("alexnet_lpips:pool5:227:gradient") == (
        "alexnet_lpips", "pool5", 227, "gradient",
    )  # fmt: skip
    with pytest.raises(ValueError, match="backbone:layer:input_size:map_type"):
        E._parse_candidate("alexnet_lpips:pool5")
    with pytest.raises(ValueError, match="unknown preset"):
        E.get_config("huge")


def test_mean_position_baseline_by_hand():
    boxes = np.array([[0, 0, 10, 10], [10, 10, 30, 20], [0, 0, 100, 50]], np.float32)
    # Part 0 at box-relative (0.2, 0.5) and (0.4, 0.7) in the two training images.
    parts = np.array([[[2, 5]], [[18, 17]], [[0, 0]]], np.float32)
    visible = np.ones((3, 1), bool)
    train = np.array([True, True, False])
    pred = E._mean_position_baseline(parts, visible, boxes, train, np.array([2]))
    np.testing.assert_allclose(pred, [[[30.0, 30.0]]], rtol=1e-6)


def test_patch_regions_side_and_clipping():
    ref = np.array([[0, 0, 90, 40]], np.float32)  # n·m = 3600; λ = 1/4 -> side 30
    hw = np.array([[40, 90]], np.float32)
    r = E._patch_regions(np.array([[[45.0, 20.0], [2.0, 39.0]]]), ref, 0.25, hw)
    np.testing.assert_allclose(r[0, 0], [30, 5, 60, 35])
    np.testing.assert_allclose(r[0, 1], [0, 10, 30, 40])  # shifted inside the image


def test_predict_averages_the_m_best_channels():
    centres = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)
    chans = np.array([[0, 2], [3, 3]])
    out = E._predict(centres, chans)
    np.testing.assert_allclose(out[:, 0], (centres[:, 0] + centres[:, 2]) / 2)
    np.testing.assert_allclose(out[:, 1], centres[:, 3])


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_run_on_real_cub(cub_dir, tmp_path, monkeypatch):
    from experiments import common
    from fgloc.data.cub import read_cub
    from fgloc.metrics import normalized_part_error

    metrics = common.main(
        E.get_config,
        E.run,
        argv=["--data_dir", str(cub_dir.parent), "--workdir", str(tmp_path), "--preset", "smoke"],
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "norm_part_error_bbox", "norm_part_error_full", "norm_part_error_maxg_bbox",
        "cls_acc_est_parts_bbox", "cls_acc_est_parts_full", "cls_acc_gt_parts_full",
        "cls_acc_global_only", "n_images", "backbone", "layer", "seconds",
        "per_part.beak", "channel.beak", "configs.paper_gmm.norm_part_error_bbox",
        "baseline.mean_position", "baseline.box_centre", "channel_full.beak",
        "train_oracle_full.alexnet_lpips:pool5:67:gradient.gmm",
    ):  # fmt: skip
        assert key in saved, key
    for key in ("norm_part_error_bbox", "norm_part_error_full", "norm_part_error_maxg_bbox"):
        assert 0.0 < saved[key] < 1.0
    # The one-channel floor, recomputed by brute force from the cached training centres.
    cand = "alexnet_lpips:pool5:67:gradient"
    ann = read_cub(cub_dir)
    with np.load(tmp_path / "cache" / f"train_{E._slug(cand)}.cells.npz") as cache:
        rows, cent = cache["rows"], cache["values"]  # (N,), (N, K, 3, 2)
    diag = np.hypot(*(ann.boxes[rows, 2:] - ann.boxes[rows, :2]).T)
    for ci, c in enumerate(("gmm", "argmax", "mass")):
        floors = []
        for p in range(ann.parts.shape[1]):
            vis = ann.visible[rows, p].astype(bool)
            if vis.any():
                d = np.linalg.norm(cent[vis, :, ci] - ann.parts[rows[vis], None, p], axis=-1)
                floors.append(min((d / diag[vis, None]).mean(axis=0)))
        assert saved[f"train_oracle.{cand}.{c}"] == pytest.approx(np.mean(floors), rel=1e-5)
    # the rectified-gradient candidate is scored by cross-validation on the training images only
    relu_cv = saved["train_cv.efficientnet_lite0:stage6:64:gradient_relu.gmm.paper.m1"]
    assert 0.0 < relu_cv < 1.0
    assert not any(
        k.startswith("configs.efficientnet_lite0:stage6:64:gradient_relu") for k in saved
    )
    assert 0.0 <= saved["cls_acc_global_only"] <= 1.0
    assert (tmp_path / "fig2_parts.png").is_file()
    # The box-centre baseline, recomputed independently on every test image.
    te = ~ann.is_train
    centre = (ann.boxes[te, :2] + ann.boxes[te, 2:]) / 2
    pred = np.repeat(centre[:, None], ann.parts.shape[1], 1)
    _, want = normalized_part_error(pred, ann.parts[te], ann.visible[te], ann.boxes[te])
    assert saved["baseline.box_centre"] == pytest.approx(want, rel=1e-6)
    assert metrics["n_test"] == int(te.sum())

    # A second run over the same workdir reuses every cached centre and reproduces the numbers.
    def no_compute(*args, **kwargs):
        raise AssertionError("centres recomputed although cached")

    monkeypatch.setattr(E.P, "compute_centres", no_compute)
    again = common.main(
        E.get_config,
        E.run,
        argv=["--data_dir", str(cub_dir.parent), "--workdir", str(tmp_path), "--preset", "smoke"],
    )
    for key in ("norm_part_error_bbox", "norm_part_error_full", "cls_acc_est_parts_bbox"):
        assert again[key] == metrics[key], key
