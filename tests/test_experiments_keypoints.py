"""experiments/keypoint_fcn_cub: configuration checks (impossible options name the option),
annotation checks (wrong part count, nothing visible), and end-to-end smoke runs on real CUB
(Lite0 smoke, the paper's VGG16 setting in a tiny version) asserting the metric keys."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from experiments import keypoint_fcn_cub as exp
from experiments.configs import keypoint_fcn_cub as configs
from fgloc.data import cub
from fgloc.metrics import CUB_PART_GROUPS, CUB_PART_NAMES, PCP_MIN_VISIBLE

LITE0_LAYERS = ["stem", *(f"block{i}" for i in range(16)), *(f"stage{k}" for k in range(1, 8))]
LITE0_LAYERS.append("pre_pool")


def test_presets_load_and_validate():
    for name in configs.PRESETS:
        c = configs.get_config(name)
        exp.validate_config(c)
    assert configs.get_config(None).input_size == configs.get_config("default").input_size
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        configs.get_config("nope")
    exp.validate_config(configs.get_config(), LITE0_LAYERS)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("input_size", 100, "config.input_size: must be a positive multiple of 32"),
        ("eval_split", "dev", "config.eval_split"),
        ("decoder", "mean", "config.decoder: must be one of"),
        ("window", 4, "config.window: must be a positive odd"),
        ("num_devices", 3, "config.batch_size: 16 must be a positive multiple of the 3"),
        ("use_flip_test", True, "config.use_flip_test: needs flip_test"),
        ("test_sizes", (384, 384), "config.test_sizes: must be distinct positive"),
        ("test_sizes", (0,), "config.test_sizes: must be distinct positive"),
    ],
)
def test_impossible_options_name_the_option(field, value, message):
    c = configs.get_config()
    c[field] = value
    if field == "use_flip_test":
        c.flip_test = False
    with pytest.raises(ValueError, match=message):
        exp.validate_config(c)


def test_impossible_layer_options():
    def bad(change, message):
        c = configs.get_config()
        change(c)
        with pytest.raises(ValueError, match=message):
            exp.validate_config(c, LITE0_LAYERS)

    bad(lambda c: setattr(c.kp, "loss", "mse"), "config.kp.loss")
    bad(lambda c: setattr(c.kp, "layers", ("stage5", "fc9")), r"config.kp.layers: layers \['fc9'\]")
    bad(lambda c: setattr(c.kp_ft, "start_at", "stage7"), "config.kp_ft.start_at.*must come before")
    bad(lambda c: setattr(c, "extract_stop", "stage6"), "come after extract_stop 'stage6'")
    bad(lambda c: setattr(c.cls, "bilinear", "cubic"), "config.cls.bilinear")
    bad(lambda c: setattr(c.extra, "heads", ("floor", "best")), r"unknown heads \['best'\]")
    bad(
        lambda c: setattr(c.kp, "flip_augment", True) or setattr(c, "flip_train", False),
        "config.kp.flip_augment: needs flip_train",
    )


def _fake_cub(parent: pathlib.Path, part_names, visible=True) -> pathlib.Path:
    root = parent / "CUB_200_2011"
    (root / "parts").mkdir(parents=True)
    (root / "images" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "images/a/x.jpg")
    (root / "classes.txt").write_text("1 001.A\n")
    (root / "parts/parts.txt").write_text(
        "".join(f"{i} {n}\n" for i, n in enumerate(part_names, 1))
    )
    (root / "images.txt").write_text("1 a/x.jpg\n")
    (root / "image_class_labels.txt").write_text("1 1\n")
    (root / "train_test_split.txt").write_text("1 1\n")
    (root / "bounding_boxes.txt").write_text("1 1 1 10 10\n")
    v = int(visible)
    rows = [
        f"1 {p} {5.0 if v else 0} {5.0 if v else 0} {v}\n" for p in range(1, len(part_names) + 1)
    ]
    (root / "parts/part_locs.txt").write_text("".join(rows))
    return root


def test_pcp_if_within_replaces_only_the_gross_errors_of_one_part():
    """Hand-made body box [0, 30] x [0, 100] (back, belly, breast, tail): the tail predicted 80
    px off (a miss at alpha 0.10 of a 100 px box) shrinks the box to IoU 0.25; the breast 5 px
    off is a small error the oracle keeps."""
    import types

    idx = {n: CUB_PART_NAMES.index(n) for n in ("back", "belly", "breast", "tail")}
    true = np.zeros((1, 15, 2))
    vis = np.zeros((1, 15), bool)
    for n, xy in {
        "back": (30, 0),
        "belly": (30, 100),
        "breast": (0, 50),
        "tail": (100, 50),
    }.items():
        true[0, idx[n]] = xy
        vis[0, idx[n]] = True
    pred = true.copy()
    pred[0, idx["tail"]] = (20, 50)
    pred[0, idx["breast"]] = (5, 50)
    ann = types.SimpleNamespace(parts=true, visible=vis, boxes=np.array([[0.0, 0, 100, 100]]))
    m = exp._pcp_if_within(pred, ann)
    assert exp._keypoint_metrics(pred, ann)["pcp_body"] == 0.0
    assert m["pcp_body_if_within_0.10.tail"] == 1.0  # box x 5..100: IoU 0.95
    assert m["pcp_body_if_within_0.10.back"] == 0.0  # no miss to replace
    assert m["pcp_body_if_within_0.10.all"] == 1.0
    assert np.isnan(m["pcp_head_if_within_0.10.all"])  # no visible head part


def test_annotation_part_count_and_visibility_are_checked(tmp_path):
    ann = cub.read_cub(_fake_cub(tmp_path / "ok", CUB_PART_NAMES))
    assert exp.check_annotations(ann) is ann
    sixteen = cub.read_cub(_fake_cub(tmp_path / "16", [*CUB_PART_NAMES, "tail feather"]))
    with pytest.raises(ValueError, match="have 16 parts.*needs the 15 CUB parts"):
        exp.check_annotations(sixteen)
    none = cub.read_cub(_fake_cub(tmp_path / "none", CUB_PART_NAMES, visible=False))
    with pytest.raises(ValueError, match="no keypoint is visible"):
        exp.check_annotations(none)
    # a part_locs.txt row for a part the parts.txt does not list: the reader names file and line
    root = _fake_cub(tmp_path / "14", CUB_PART_NAMES[:14])
    with (root / "parts/part_locs.txt").open("a") as f:
        f.write("1 15 5 5 1\n")
    with pytest.raises(cub.CubFormatError, match=r"part_locs.txt.*part id 15 out of range 1..14"):
        cub.read_cub(root)
    moved = dataclasses.replace(ann, part_names=tuple(reversed(CUB_PART_NAMES)))
    with pytest.raises(ValueError, match="15 CUB parts"):
        exp.check_annotations(moved)


KEYS = [
    *(f"pck@{a:.2f}" for a in exp.ALPHAS),
    "pcp_head",
    "pcp_body",
    "pcp_head_torso",
    "pcp_body_torso",
    "cls_acc_holistic",
    "cls_acc_holistic_bilinear",
    "cls_acc_joint",
    "cls_acc_joint_bilinear",
    "cls_acc_keypoint_features",
    "n_images",
    "backbone",
    "input_size",
    "seconds",
]


def _run(preset, shared_data, workdir, *overrides):
    from experiments import common

    argv = ["--config", f"{configs.__file__}:{preset}", "--workdir", str(workdir)]
    argv += ["--data_dir", str(shared_data), *overrides]
    return common.main(exp.run, argv)


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_run_keys_relations_and_resume(shared_data, tmp_path):
    m = _run("smoke", shared_data, tmp_path)
    for k in KEYS:
        assert k in m, k
    assert m["backbone"] == "efficientnet_lite0" and m["input_size"] == 96
    pck = [m[f"pck@{a:.2f}"] for a in exp.ALPHAS]
    assert all(0 <= v <= 1 for v in pck) and pck == sorted(pck)  # PCK grows with α
    for name in ("floor", "paper_setting"):
        assert f"{name}.pck@0.05" in m and f"ablation.{name}.pck@0.10" in m
    assert (
        "ablation.final.argmax.pck@0.05" in m and "ablation.stage1_frozen.dark+flip.pck@0.10" in m
    )
    assert len([k for k in m if k.startswith("per_part_pck@0.10.")]) == 15
    # multi-scale test (sizes 96 and 128): the headline is its row; its 96 row, computed from
    # the photos by the predictor, is the single-scale row computed from the cached float16 maps
    ms = "ablation.final_multiscale"
    for k in ("pck@0.10", "pcp_body"):
        assert m[k] == m[f"{ms}.{k}"]
    assert abs(m[f"{ms}.size96.pck@0.10"] - m["ablation.final.pck@0.10"]) <= 0.05
    assert f"{ms}.size128.pck@0.05" in m and m["seconds.multiscale_test"] > 0
    # the PCP breakdown by visible keypoints per box adds up to the PCP
    for g in ("head", "body"):
        ks = [k.split(".")[-1] for k in m if k.startswith(f"pcp_{g}_by_visible.")]
        n = sum(m[f"n_{g}_boxes_by_visible.{k}"] for k in ks)
        hits = sum(m[f"pcp_{g}_by_visible.{k}"] * m[f"n_{g}_boxes_by_visible.{k}"] for k in ks)
        assert (
            ks
            and min(int(k) for k in ks) >= PCP_MIN_VISIBLE
            and hits / n == pytest.approx(m[f"pcp_{g}"])
        )
        # the oracle that replaces one part's PCK@0.10 misses by the truth (per part, and all
        # of the group's): not monotone in general (two errors can cancel in one box), so only
        # its keys and range here; its values: test_pcp_if_within_replaces_only_...
        bound = {k: v for k, v in m.items() if k.startswith(f"pcp_{g}_if_within_0.10.")}
        assert len(bound) == len(CUB_PART_GROUPS[g]) + 1
        assert all(0 <= v <= 1 for v in bound.values())
    assert sorted(p.name for p in (tmp_path / "multiscale").iterdir()) == [
        "size128.npz",
        "size96.npz",
    ]
    assert all(m[f"seconds.stage_{s}"] >= 0 for s in ("1_keypoints", "2_keypoints_finetune"))
    assert (tmp_path / "predictor" / "predictor.json").is_file()
    assert (tmp_path / "keypoints_cub.png").is_file()
    stage_dirs = sorted(p.name.split("-")[0] for p in (tmp_path / "stages").iterdir())
    assert {"1_keypoints", "2_keypoints_finetune", "4_classifier_finetune"} <= set(stage_dirs)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_images"] == m["n_images"]
    # a second run resumes from the caches and finished stages: same numbers, no training
    again = _run("smoke", shared_data, tmp_path)
    assert again["pck@0.10"] == m["pck@0.10"]
    assert again["cls_acc_joint_bilinear"] == m["cls_acc_joint_bilinear"]
    assert again["seconds.stage_1_keypoints"] == 0.0
    assert again[f"{ms}.size128.pck@0.05"] == m[f"{ms}.size128.pck@0.05"]  # from its cache
    # a size off the stride-16 grid is refused before any stage runs (its stage is not redone)
    with pytest.raises(ValueError, match=r"config.test_sizes: \[104\] are not multiples"):
        _run("smoke", shared_data, tmp_path, "--config.test_sizes=(96,104)")
    from fgloc.localize.keypoint_predictor import KeypointPredictor

    pred = KeypointPredictor.load(tmp_path / "predictor")
    assert pred.test_sizes == (96, 128)
    xy, conf = pred.predict_keypoints([np.zeros((50, 80, 3), np.uint8)])
    assert xy.shape == (1, 15, 2) and conf.shape == (1, 15)


@pytest.mark.slow
@pytest.mark.real_data
def test_paper_vgg16_tiny_runs(shared_data, tmp_path):
    m = _run("paper_vgg16_tiny", shared_data, tmp_path)
    assert m["backbone"] == "vgg16_lpips" and m["decoder"] == "argmax"
    for k in KEYS:
        assert k in m, k
    info = json.loads(next((tmp_path / "stages").glob("1_keypoints-*/stage.json")).read_text())
    assert info["layers"] == ["pool5"] and info["backbone"] == "vgg16_lpips"


# ------------------------------------------------------------- class-disjoint protocol (issue 18)
def test_class_disjoint_splits_keep_the_class_sets_apart(cub_dir):
    ann = cub.read_cub(cub_dir)
    c = configs.get_config("class_disjoint")
    exp.validate_config(c)
    s = exp._splits(ann, c)
    train, test = ann.split("train"), ann.split("test")
    # positions index the whole official splits (so a run on every class shares its caches)
    assert s["train"][0] is not None and len(s["train"][0]) == len(train)
    assert len(s["eval"][0]) == len(test) and len(s["design"][0]) == len(train)
    labels = {r: base.labels[idx] + 1 for r, (base, idx) in s.items()}
    assert set(labels["train"]) == set(labels["eval"]) == set(cub.SCORE_CLASSES)
    assert set(labels["design"]) == set(cub.DESIGN_CLASSES)
    assert len(s["train"][1]) == int(np.isin(train.labels + 1, cub.SCORE_CLASSES).sum())
    assert len(s["eval"][1]) == int(np.isin(test.labels + 1, cub.SCORE_CLASSES).sum())
    # design_val: a train/val split of the design classes' training images only
    v = exp._splits(ann, configs.get_config("design_val"))
    assert v["eval"][0] is v["train"][0] and "design" not in v
    assert not set(v["train"][1]) & set(v["eval"][1])
    for r in ("train", "eval"):
        assert set(v[r][0].labels[v[r][1]] + 1) == set(cub.DESIGN_CLASSES)
    n = int(np.isin(train.labels + 1, cub.DESIGN_CLASSES).sum())
    assert len(v["train"][1]) + len(v["eval"][1]) == n


def test_class_options_are_checked():
    c = configs.get_config("class_disjoint")
    c.design_classes = "score"
    with pytest.raises(ValueError, match="config.design_classes: must differ"):
        exp.validate_config(c)
    c = configs.get_config()
    c.design_classes = "design"
    with pytest.raises(ValueError, match="config.design_classes: needs classes"):
        exp.validate_config(c)
    c.classes = "birds"
    with pytest.raises(ValueError, match="config.classes: must be one of"):
        exp.validate_config(c)


def test_feature_reuse_serves_a_subset_of_a_whole_chunk_read_only(tmp_path):
    from fgloc.cache import digest, save_npz

    @dataclasses.dataclass
    class Base:
        paths: list

    c = configs.get_config("smoke")
    c.extract_batch = 2  # chunks of 8 images
    base = Base([f"/x/im{i:02d}.jpg" for i in range(12)])
    reuse, own = tmp_path / "reuse", tmp_path / "own"
    reuse.mkdir()
    key = {
        "backbone": c.backbone,
        "size": c.input_size,
        "flip": False,
        "layers": ["stage7"],
        "stop": c.extract_stop,
        "dtype": c.cache_dtype,
        "files": [f"im{i:02d}.jpg" for i in range(8)],
    }
    maps = np.arange(8, dtype=np.float16).reshape(8, 1, 1, 1)
    save_npz(reuse / "train_orig_00000.npz", {"__key__": np.asarray(digest(key)), "stage7": maps})
    before = sorted(p.stat().st_mtime_ns for p in reuse.iterdir())
    got = exp._extract(None, base, np.array([5, 2, 6]), c, ["stage7"], False, own, "train", reuse)
    np.testing.assert_array_equal(got["stage7"].ravel(), [5, 2, 6])
    assert sorted(p.stat().st_mtime_ns for p in reuse.iterdir()) == before
    assert not own.exists()  # nothing computed, nothing written
