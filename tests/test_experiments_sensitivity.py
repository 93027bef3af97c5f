"""Tests for experiments/sensitivity_corloc.py (paper 004 end to end)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from experiments import common
from experiments import sensitivity_corloc as exp


def test_settings_from_config_types_and_errors():
    s = exp.Settings.from_config(exp.get_config())
    assert s.pool_sizes == (8, 16, 32) and s.norms == ("none", "max", "sum")
    assert s.dataset == "auto" and s.target_class == "top1" and s.backbone == "efficientnet_lite0"
    smoke = exp.Settings.from_config(exp.get_config("smoke"))
    assert smoke.max_images == 16 and smoke.input_size == 64
    bad = exp.get_config()
    bad.target_class = "species"
    with pytest.raises(ValueError, match="target_class"):
        exp.Settings.from_config(bad)
    bad = exp.get_config()
    bad.chunk_size = 12
    with pytest.raises(ValueError, match="chunk_size 12 must be a multiple"):
        exp.Settings.from_config(bad)
    with pytest.raises(ValueError, match="unknown preset"):
        exp.get_config("huge")


def test_config_overrides_are_typed():
    config = common.apply_overrides(exp.get_config(), ["pool_sizes=(4, 8)", "seed=3"])
    s = exp.Settings.from_config(config)
    assert s.pool_sizes == (4, 8) and s.seed == 3


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
    settings = dataclasses.replace(
        exp.Settings.from_config(exp.get_config()),
        pool_sizes=(16,),
        norms=("none", "sum"),
        cv_folds=3,
        threshold_map_size=32,
        thresholds=(0.1, 0.5),
    )
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
    mk, bk = exp.evaluate(kfold, out, dataclasses.replace(settings, eval_folds=3))
    assert mk["n_images"] == 240 and np.array_equal(np.sort(bk["test"]), np.arange(240))
    assert mk["corloc"] >= 0.45 and mk["corloc"] > mk["corloc_center_baseline"] + 0.3, mk


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_run_on_real_data(shared_data: pathlib.Path, tmp_path: pathlib.Path):
    """The smoke preset end to end with the embedded Lite0: both datasets, metrics, figures."""
    metrics = common.main(
        exp.get_config,
        exp.run,
        ["--data_dir", str(shared_data), "--workdir", str(tmp_path), "--preset", "smoke"],
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("corloc", "corloc_threshold_box", "corloc_center_baseline", "n_images"):
        assert 0 <= written[key] <= (1 if key != "n_images" else 16), key
        for prefix in ("cub_", "imagenet_"):
            assert prefix + key in written
    assert written["backbone"] == "efficientnet_lite0" and written["seconds"] > 0
    assert written["n_images"] == 8 and written["imagenet_n_images"] == 16
    assert written["dataset"] == "cub+imagenet" and metrics["corloc"] == written["corloc"]
    assert (tmp_path / "examples_cub.png").stat().st_size > 1000
    assert (tmp_path / "examples_imagenet.png").stat().st_size > 1000
    assert len(list((tmp_path / "cache").glob("cub_*.npz"))) == 2  # 16 images, chunks of 8
