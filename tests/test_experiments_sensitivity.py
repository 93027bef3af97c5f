"""Tests for experiments/sensitivity_corloc.py (paper 004 end to end)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest

from experiments import common, configs
from experiments import sensitivity_corloc as exp


def test_configs_and_checks():
    c = configs.get("sensitivity_corloc")
    exp.check_config(c)
    assert c.regression.pool_sizes == (8, 16, 32) and c.regression.norms == ("none", "max", "sum")
    assert c.dataset == "cub" and c.target_class == "top1" and c.backbone == "efficientnet_lite0"
    assert configs.get("sensitivity_corloc", "imagenet").dataset == "imagenet"
    smoke = configs.get("sensitivity_corloc", "smoke")
    assert smoke.max_images == 300 and smoke.input_size == 160 and smoke.dataset == "both"
    bad = configs.get("sensitivity_corloc")
    bad.target_class = "species"
    with pytest.raises(ValueError, match="target_class"):
        exp.check_config(bad)
    bad = configs.get("sensitivity_corloc")
    bad.chunk_size = 12
    with pytest.raises(ValueError, match="chunk_size 12 must be a multiple"):
        exp.check_config(bad)
    with pytest.raises(ValueError, match="unknown preset"):
        configs.get("sensitivity_corloc", "huge")


def test_config_overrides_are_typed():
    config: Any = common.apply_overrides(
        configs.get("sensitivity_corloc"), ["regression.pool_sizes=(4, 8)", "seed=3"]
    )
    assert config.regression.pool_sizes == (4, 8) and config.seed == 3


def test_image_order_prefix_is_balanced_and_deterministic():
    is_train = np.array([True] * 7 + [False] * 4)
    order = exp.image_order(is_train, 11, seed=0)
    np.testing.assert_array_equal(np.sort(order), np.arange(11))
    np.testing.assert_array_equal(order, exp.image_order(is_train, 11, seed=0))
    # Alternating train / test while both last: any even prefix is half and half.
    np.testing.assert_array_equal(is_train[order[:8]], [True, False] * 4)
    assert np.all(is_train[order[8:]])
    assert not np.array_equal(order, exp.image_order(is_train, 11, seed=1))


def test_bird_classes_are_the_imagenet_birds():
    from fgloc.pretrained import imagenet_class_names

    names = imagenet_class_names()
    assert exp.BIRD_CLASSES.size == 59 and np.unique(exp.BIRD_CLASSES).size == 59
    first = {int(i): names[int(i)].split(",")[0] for i in exp.BIRD_CLASSES}
    assert first[7] == "cock" and first[24] == "great grey owl"
    assert first[80] == "black grouse" and first[100] == "black swan"
    assert first[127] == "white stork" and first[146] == "albatross"
    # The neighbours just outside the ranges are not birds.
    assert [names[i].split(",")[0] for i in (6, 25, 79, 101, 126, 147)] == [
        "stingray",
        "European fire salamander",
        "centipede",
        "tusker",
        "isopod",
        "grey whale",
    ]


def test_find_datasets(tmp_path: pathlib.Path):
    cub = tmp_path / "CUB_200_2011"
    inet = tmp_path / "imagenet_val_sample"
    cub.mkdir()
    inet.mkdir()
    (cub / "images.txt").write_text("")
    (inet / "class_labels.txt").write_text("")
    assert exp.find_datasets(tmp_path, "auto") == {"cub": cub, "imagenet": inet}
    assert exp.find_datasets(cub, "auto") == {"cub": cub}
    assert exp.find_datasets(inet, "auto") == {"imagenet": inet}
    assert exp.find_datasets(tmp_path, "imagenet") == {"imagenet": inet}
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        exp.find_datasets(inet, "cub")
    with pytest.raises(FileNotFoundError, match="neither a CUB-200-2011 folder"):
        exp.find_datasets(tmp_path / "nothing", "auto")
    with pytest.raises(ValueError, match="config.dataset"):
        exp.find_datasets(tmp_path, "coco")


def test_threshold_boxes_hand_computed():
    m = np.zeros((1, 10, 10), np.float32)
    m[0, 2:5, 3:9] = 1.0  # rows 2..4, columns 3..8
    m[0, 8, 0] = 0.9  # a smaller separate region
    boxes = exp.threshold_boxes(m, np.array([[100, 200]]), 0.5, side=10)
    np.testing.assert_allclose(boxes, [[60, 20, 180, 50]])  # x by 200/10, y by 100/10


def _synthetic_records(n: int, seed: int = 0) -> tuple[exp.Records, np.ndarray]:
    """Records whose 'sensitivity maps' are 1 inside the true box (map at 32 x 32)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 400, (n, 2))
    rel = np.sort(rng.uniform(0.05, 0.95, (n, 2, 2)), axis=2)  # (n, axis, lo/hi)
    rel[:, :, 1] = np.maximum(rel[:, :, 1], rel[:, :, 0] + 0.25)
    rel = np.clip(rel, 0, 1)
    h, w = sizes[:, 0].astype(float), sizes[:, 1].astype(float)
    boxes = np.stack([rel[:, 0, 0] * w, rel[:, 1, 0] * h, rel[:, 0, 1] * w, rel[:, 1, 1] * h], 1)
    grid = (np.arange(32) + 0.5) / 32
    inside_x = (grid[None] >= rel[:, 0, :1]) & (grid[None] < rel[:, 0, 1:])
    inside_y = (grid[None] >= rel[:, 1, :1]) & (grid[None] < rel[:, 1, 1:])
    maps = (inside_y[:, :, None] & inside_x[:, None, :]).astype(np.float32)
    maps += 0.02 * rng.random(maps.shape).astype(np.float32)
    records = exp.Records(
        name="synthetic",
        paths=np.array([f"img{i}.jpg" for i in range(n)]),
        sizes=sizes,
        boxes=[b[None] for b in boxes],
        labels=np.full(n, -1),
        is_train=np.arange(n) < n * 2 // 3,
    )
    return records, maps


def test_evaluate_on_synthetic_box_maps():
    records, maps = _synthetic_records(240)
    settings = configs.get("sensitivity_corloc")
    settings.regression.pool_sizes = (16,)
    settings.regression.norms = ("none", "sum")
    settings.regression.cv_folds = 3
    settings.threshold_box.map_size = 32
    settings.threshold_box.thresholds = (0.1, 0.5)
    out = {"maps": maps, "top5": np.zeros((240, 5), np.int64)}
    m, boxes = exp.evaluate(records, out, settings)
    assert m["n_images"] == 80 and m["n_train"] == 160
    assert set(boxes) >= {"learned", "threshold", "center", "test"}
    # The threshold rule reads an indicator map exactly (up to the 1/32 grid): CorLoc 1.
    assert m["corloc_threshold_box"] == 1.0 and m["threshold"] in (0.1, 0.5)
    # Box edges are not linear functions of an indicator map, so the learned map is only
    # approximate here (measured: CorLoc 0.54, mean IoU 0.53), yet far above the centre box
    # (CorLoc 0.075: these boxes are spread uniformly, not centred).
    assert m["corloc"] >= 0.45, m
    assert m["corloc_center_baseline"] < m["corloc"] - 0.3, m
    assert 0.0 <= m["mean_iou_center_baseline"] < m["mean_iou"] <= 1.0
    # k-fold (ImageNet-style) evaluation predicts every image out of fold.
    kfold = records._replace(is_train=None)
    settings.eval_folds = 3
    mk, bk = exp.evaluate(kfold, out, settings)
    assert mk["n_images"] == 240 and np.array_equal(np.sort(bk["test"]), np.arange(240))
    assert mk["corloc"] >= 0.45 and mk["corloc"] > mk["corloc_center_baseline"] + 0.3, mk


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_run_on_real_data(shared_data: pathlib.Path, tmp_path: pathlib.Path):
    """The smoke preset end to end with the embedded Lite0 (both datasets, metrics, figures),
    and the README's paper-4 relation on its CUB part: the learned linear map's box beats the
    centre-box baseline (measured CorLoc 62.7 vs 52.7 %, mean IoU 0.543 vs 0.501)."""
    config = f"{common.CONFIG_DIR}/sensitivity_corloc.py:smoke"
    metrics = common.main(
        exp.run, ["--config", config, "--data_dir", str(shared_data), "--workdir", str(tmp_path)]
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("corloc", "corloc_threshold_box", "corloc_center_baseline"):
        assert 0 <= written[key] <= 1, key
        for prefix in ("cub_", "imagenet_"):
            assert prefix + key in written
    assert written["backbone"] == "efficientnet_lite0" and written["seconds"] > 0
    assert written["n_images"] == 150 and written["imagenet_n_images"] == 50
    assert written["dataset"] == "cub+imagenet" and metrics["corloc"] == written["corloc"]
    # The relation the README claims (CUB): learned box above the centre box.
    assert written["cub_corloc"] > written["cub_corloc_center_baseline"], written
    assert written["cub_mean_iou"] > written["cub_mean_iou_center_baseline"], written
    assert (tmp_path / "examples_cub.png").stat().st_size > 1000
    assert (tmp_path / "examples_imagenet.png").stat().st_size > 1000
    assert len(list((tmp_path / "cache").glob("cub_*.npz"))) == 10  # 300 images, chunks of 32


def _disjoint_records(n: int = 300) -> tuple[exp.Records, np.ndarray]:
    """Synthetic records with CUB classes 1..25 (design 1-12, score 13-25), half train."""
    records, maps = _synthetic_records(n, seed=1)
    classes = np.arange(n) % 25 + 1
    return records._replace(classes=classes, is_train=(np.arange(n) // 25) % 2 == 0), maps


def test_class_disjoint_design_never_sees_score_classes(monkeypatch):
    from fgloc.data.cub import DESIGN_CLASSES, SCORE_CLASSES

    records, maps = _disjoint_records()
    assert records.classes is not None and records.is_train is not None
    settings = configs.get("sensitivity_corloc", "class_disjoint")
    assert settings.class_disjoint and not configs.get("sensitivity_corloc").class_disjoint
    settings.regression.pool_sizes = (16,)
    settings.regression.norms = ("none", "sum")
    settings.regression.cv_folds = 3
    settings.threshold_box.map_size = 32
    settings.threshold_box.thresholds = (0.1, 0.5)
    seen: list[np.ndarray] = []
    choose = exp.choose_settings

    def spy(maps, recs, train, config):
        seen.append(np.asarray(train))
        return choose(maps, recs, train, config)

    monkeypatch.setattr(exp, "choose_settings", spy)
    m, split = exp.evaluate_disjoint(records, {"maps": maps}, settings)
    # Two design steps: classes 1-12 (the check) and all training images (the headline's).
    assert len(seen) == 2
    assert set(records.classes[seen[0]]) == set(DESIGN_CLASSES)
    assert np.all(records.is_train[seen[0]])
    np.testing.assert_array_equal(seen[1], np.flatnonzero(records.is_train))
    for key, classes, train in (
        ("design_train", DESIGN_CLASSES, True),
        ("design_test", DESIGN_CLASSES, False),
        ("score_train", SCORE_CLASSES, True),
        ("score_test", SCORE_CLASSES, False),
    ):
        assert set(records.classes[split[key]]) == set(classes), key
        assert np.all(records.is_train[split[key]] == train), key
    assert m["disjoint.n_images"] == len(split["score_test"]) == 78  # 13 classes x 6 images
    assert m["disjoint.n_train"] == len(split["score_train"]) == 78
    assert m["disjoint.full.n_train"] == int(records.is_train.sum())
    assert m["disjoint.n_design_train"] == len(split["design_train"]) == 72
    for prefix in ("disjoint.", "disjoint.design_test.", "disjoint.full.", "disjoint.full_design."):
        for key in ("corloc", "corloc_threshold_box", "corloc_center_baseline", "mean_iou"):
            assert 0.0 <= m[prefix + key] <= 1.0, prefix + key
    # An indicator map is read exactly by the threshold rule, on any classes.
    assert m["disjoint.corloc_threshold_box"] == 1.0
    assert m["disjoint.corloc"] > m["disjoint.corloc_center_baseline"], m
    # Same settings -> the headline arm's unit-free λ is the design's own.
    assert m["disjoint.full.alpha"] == pytest.approx(m["disjoint.full_design.alpha"])
    # ImageNet-style records (no classes) are refused.
    with pytest.raises(ValueError, match="class_disjoint needs CUB"):
        exp.class_disjoint_split(records._replace(classes=None))


@pytest.mark.real_data
def test_smoke_disjoint_run_on_real_cub(shared_data: pathlib.Path, tmp_path: pathlib.Path):
    """The class-disjoint preset end to end on 120 CUB images at 64 px: keys, ranges, and the
    written split shows no score-class image among the design images."""
    from fgloc.data.cub import DESIGN_CLASSES, SCORE_CLASSES

    config = f"{common.CONFIG_DIR}/sensitivity_corloc.py:smoke_disjoint"
    common.main(
        exp.run, ["--config", config, "--data_dir", str(shared_data), "--workdir", str(tmp_path)]
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["n_images"] == 60 and written["dataset"] == "cub"
    for prefix in ("disjoint.", "disjoint.design_test.", "disjoint.full.", "disjoint.full_design."):
        for key in ("corloc", "corloc_threshold_box", "corloc_center_baseline", "mean_iou"):
            assert 0.0 <= written[prefix + key] <= 1.0, prefix + key
        assert written[prefix + "n_images"] > 10 and written[prefix + "n_train"] > 10
    split = json.loads((tmp_path / "disjoint_split_cub.json").read_text())
    assert {c for _, c in split["design_train"]} <= set(DESIGN_CLASSES)
    for key in ("score_train", "score_test"):
        assert {c for _, c in split[key]} <= set(SCORE_CLASSES), key
    design_paths = {p for p, _ in split["design_train"]}
    assert not design_paths & {p for p, _ in split["score_train"] + split["score_test"]}
    assert written["disjoint.n_design_train"] == len(split["design_train"])
    assert written["disjoint.n_images"] == len(split["score_test"])
