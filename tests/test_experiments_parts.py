"""Tests for experiments/part_discovery_cub.py (paper 1 on CUB): configs, helpers, a smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import common
from experiments import part_discovery_cub as E
from experiments.configs import part_discovery_cub as C

CONFIG = str(common.CONFIG_DIR / "part_discovery_cub.py")


def test_presets_are_structured_and_complete():
    for name in C.PRESETS:
        c = C.get_config(name)
        assert c.paper_candidate in c.candidates, name
        for cand in c.candidates.values():
            assert set(cand) >= {"backbone", "layer", "input_size", "map_type", "n_train"}
    assert C.get_config(None).to_dict() == C.get_config("default").to_dict()
    paper = C.get_config("paper_alexnet_gradient")
    cand = paper.candidates.alexnet_grad
    assert E.describe(cand) == "alexnet_lpips:pool5:227:gradient"
    assert (cand.n_train, cand.n_test, cand.top_m, cand.ridge) == (400, 0, (1,), False)
    assert paper.selections == ("paper",) and not paper.classification.enabled
    assert paper.only_evals == ("paper_gmm", "paper_maxg")
    for preset, n in (("paper_alexnet_gradient_160", 160), ("paper_alexnet_gradient_40", 40)):
        fewer = C.get_config(preset)
        assert fewer.candidates.alexnet_grad.n_train == n
        fewer.candidates.alexnet_grad.n_train = 400
        assert fewer.to_dict() == paper.to_dict(), preset  # nothing else differs
    ff = C.get_config("paper_alexnet_gradient_fullframe")
    assert ff.full_frame_fit and ff.candidates.alexnet_grad.n_train == 160
    types = C.get_config("lite0_map_types")
    assert [c.map_type for c in types.candidates.values()] == [
        "activation", "gradient", "gradient_relu",
    ]  # fmt: skip
    assert [c.cv_only for c in types.candidates.values()] == [False, True, True]
    assert all(c.n_train == 60 for c in types.candidates.values())
    caffe = C.get_config("paper_caffenet").candidates.caffenet
    assert (caffe.backbone, caffe.weights) == ("caffe", "")  # the user names the file
    caffe.weights = "W/c.npz"
    assert E.describe(caffe) == "caffe=W/c.npz:pool5:227:gradient"
    with pytest.raises(ValueError, match="unknown preset"):
        C.get_config("huge")


def test_command_line_overrides_a_candidate_field(tmp_path):
    argv = ["--config", f"{CONFIG}:paper_alexnet_gradient", "--workdir", str(tmp_path)]
    argv += ["--config.candidates.alexnet_grad.n_train=160"]
    config, _, _ = common.parse_args(E.run, argv)
    assert config.candidates.alexnet_grad.n_train == 160
    with pytest.raises(SystemExit):
        common.parse_args(E.run, [*argv[:4], "--config.candidates.alexnet_grad.n_trian=1"])


def test_caffe_candidate_without_weights_names_the_field(cub_dir, tmp_path):
    c = C.get_config("paper_caffenet")
    with pytest.raises(ValueError, match=r"--config\.caffe_weights=PATH\.npz"):
        E.run(c, cub_dir.parent, tmp_path)


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


@pytest.mark.slow
@pytest.mark.real_data
def test_smoke_run_on_real_cub(cub_dir, tmp_path, monkeypatch):
    from fgloc.data.cub import read_cub
    from fgloc.localize import parts as P
    from fgloc.metrics import normalized_part_error

    argv = ["--config", f"{CONFIG}:smoke", "--workdir", str(tmp_path)]
    argv += ["--data_dir", str(cub_dir.parent)]
    metrics = common.main(E.run, argv)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "norm_part_error_bbox", "norm_part_error_full", "norm_part_error_maxg_bbox",
        "cls_acc_est_parts_bbox", "cls_acc_est_parts_full", "cls_acc_gt_parts_full",
        "cls_acc_global_only", "n_images", "backbone", "layer", "seconds",
        "per_part.beak", "channel.beak", "configs.paper_gmm.norm_part_error_bbox",
        "baseline.mean_position", "baseline.box_centre", "train_oracle_full.alexnet_grad.gmm",
    ):  # fmt: skip
        assert key in saved, key
    for key in ("norm_part_error_bbox", "norm_part_error_full", "norm_part_error_maxg_bbox"):
        assert 0.0 < saved[key] < 1.0
    assert saved["candidates.alexnet_grad"] == "alexnet_lpips:pool5:67:gradient"
    # The one-channel floor, recomputed by brute force from the cached training centres.
    ann = read_cub(cub_dir)
    cache = tmp_path / "cache" / "train_alexnet_lpips_pool5_67_gradient.cells.npz"
    with np.load(cache) as data:
        rows, cent = data["rows"], data["values"]  # (N,), (N, K, 3, 2)
    diag = np.hypot(*(ann.boxes[rows, 2:] - ann.boxes[rows, :2]).T)
    for ci, c in enumerate(("gmm", "argmax", "mass")):
        floors = []
        for p in range(ann.parts.shape[1]):
            vis = ann.visible[rows, p].astype(bool)
            if vis.any():
                d = np.linalg.norm(cent[vis, :, ci] - ann.parts[rows[vis], None, p], axis=-1)
                floors.append(min((d / diag[vis, None]).mean(axis=0)))
        assert saved[f"train_oracle.alexnet_grad.{c}"] == pytest.approx(np.mean(floors), rel=1e-5)
    # the rectified-gradient candidate is scored by cross-validation on the training images only
    relu_cv = saved["train_cv.lite0_grad_relu.gmm.paper.m1"]
    assert 0.0 < relu_cv < 1.0
    assert not any(k.startswith("configs.lite0_grad_relu") for k in saved)
    assert 0.0 <= saved["cls_acc_global_only"] <= 1.0
    assert (tmp_path / "fig2_parts.png").is_file()
    # The box-centre baseline, recomputed independently on every test image.
    te = ~ann.is_train
    centre = (ann.boxes[te, :2] + ann.boxes[te, 2:]) / 2
    pred = np.repeat(centre[:, None], ann.parts.shape[1], 1)
    _, want = normalized_part_error(pred, ann.parts[te], ann.visible[te], ann.boxes[te])
    assert saved["baseline.box_centre"] == pytest.approx(want, rel=1e-6)
    assert metrics["n_test"] == int(te.sum())
    # README relation (Paper 1 table): the learned (ridge) default detector lies below the
    # box-centre baseline on its own test images, with and without the box.
    assert saved["default.selection"] == "ridge", saved["default.candidate"]
    base = saved["baseline.box_centre_default_test"]
    assert saved["norm_part_error_bbox"] < base - 0.02, (saved["norm_part_error_bbox"], base)
    assert saved["norm_part_error_full"] < base - 0.02, (saved["norm_part_error_full"], base)
    # The saved default detector reproduces the run's test predictions from the cached centres.
    det = P.PartDetector.load(tmp_path / "detector")
    assert (det.backbone, det.layer, det.input_size, det.map_type, det.centre) == (
        "efficientnet_lite0", "stage6", 128, "activation", saved["default.centre"],
    )  # fmt: skip
    assert det.box.kind == "ridge" and det.full is not None

    # `fgloc localize --method parts --weights W/detector` draws the 15 parts on a real photo,
    # on the whole photo and with --box (the box read-out).
    from fgloc.cli import main as cli_main
    from fgloc.data.cub import read_cub

    cub = read_cub(cub_dir)
    photo = str(cub.paths[0])
    x0, y0, x1, y1 = (float(v) for v in cub.boxes[0])
    for extra, out in (
        ([], tmp_path / "cli"),
        (["--box", f"{x0},{y0},{x1},{y1}"], tmp_path / "cli_box"),
    ):
        code = cli_main(["localize", photo, "--method", "parts", "--weights",
                         str(tmp_path / "detector"), "--out", str(out), *extra])  # fmt: skip
        assert code == 0
        (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert len(row["parts"]) == 15 and ("box" in row) == bool(extra)

    # A second run over the same workdir reuses every cached centre and reproduces the numbers.
    def no_compute(*args, **kwargs):
        raise AssertionError("centres recomputed although cached")

    monkeypatch.setattr(E.P, "compute_centres", no_compute)
    again = common.main(E.run, argv)
    for key in ("norm_part_error_bbox", "norm_part_error_full", "cls_acc_est_parts_bbox"):
        assert again[key] == metrics[key], key


@pytest.mark.real_data
def test_smoke_disjoint_run_keeps_design_and_score_classes_apart(cub_dir, tmp_path, monkeypatch):
    """Issue 18 on paper 1, 64 px: the design sweep sees only classes 1-12's training images,
    fitting and scoring only classes 13-25's; every ``disjoint.*`` key in range."""
    from fgloc.data.cub import DESIGN_CLASSES, SCORE_CLASSES, read_cub

    ann = read_cub(cub_dir)
    sweeps: list[np.ndarray] = []
    sweep = E._sweep

    def spy(config, d, cands, pool, *args, **kwargs):
        sweeps.append(np.asarray(pool))
        return sweep(config, d, cands, pool, *args, **kwargs)

    monkeypatch.setattr(E, "_sweep", spy)
    argv = ["--config", f"{CONFIG}:smoke_disjoint", "--workdir", str(tmp_path)]
    saved = common.main(E.run, [*argv, "--data_dir", str(cub_dir.parent)])
    # The design sweep (classes 1-12, train) and the headline's (all training images).
    assert len(sweeps) == 2
    assert set(ann.labels[sweeps[0]] + 1) == set(DESIGN_CLASSES) and ann.is_train[sweeps[0]].all()
    np.testing.assert_array_equal(np.sort(sweeps[1]), np.flatnonzero(ann.is_train))
    split = json.loads((tmp_path / "disjoint_split.json").read_text())
    for step, classes, train in (
        ("design", DESIGN_CLASSES, True),
        ("score_fit", SCORE_CLASSES, True),
        ("score_test", SCORE_CLASSES, False),
    ):
        assert split[step], step
        for i, c, is_train in split[step]:
            assert c in classes and is_train == train and ann.labels[i] + 1 == c, (step, i)
        assert saved[f"disjoint.n_images.{step}"] == len(split[step])
    assert saved["disjoint.design_classes"] == "1-12" and saved["disjoint.score_classes"] == "13-25"
    for prefix in ("disjoint.", "disjoint.design_test.", "disjoint.full.", "disjoint.full_design."):
        for key in ("norm_part_error_bbox", "norm_part_error_full"):
            assert 0.0 < saved[prefix + key] < 1.0, prefix + key
        if prefix != "disjoint.full_design.":  # its test images are disjoint.'s
            assert 0.0 < saved[prefix + "baseline.box_centre"] < 1.0, prefix
    for key in ("cls_acc_global_only", "cls_acc_est_parts_bbox", "cls_acc_gt_parts_full"):
        assert 0.0 <= saved["disjoint." + key] <= 1.0, key
    assert saved["disjoint.cls_n_train"] == 12 and saved["disjoint.cls_n_test"] == 6
    # The scoring fit keeps the design's per-part ridge strengths.
    if saved["disjoint.design.default.selection"] == "ridge":
        for name in ann.part_names:
            assert saved[f"disjoint.alpha_box.{name}"] == saved[f"disjoint.design.alpha_box.{name}"]
    # Scored on classes 13-25's test images only (the first n_test = 16 of them).
    assert saved["disjoint.configs.default.n_test"] == 16
    assert not any(k.startswith(("norm_part_error", "configs.")) for k in saved)  # no headline


def test_fixed_alphas_keep_the_design_strength_per_part():
    """`_fixed_alphas`: the scoring fit uses, part by part and frame by frame, the ridge
    strength the design fit chose, and equals a direct fit at that strength."""
    from fgloc.localize import parts as P

    rng = np.random.default_rng(0)

    def data(n):
        boxes = np.tile([[10.0, 20.0, 110.0, 140.0]], (n, 1))
        centres = boxes[:, None, :2] + rng.uniform(0, 100, (n, 6, 2))
        # part 0 follows channel 0 exactly, part 1 is noisy, part 2 pure noise
        parts = np.stack([centres[:, 0], centres[:, 1] + rng.normal(0, 30, (n, 2)),
                          boxes[:, None, :2][:, 0] + rng.uniform(0, 100, (n, 2))], 1)  # fmt: skip
        return centres.astype(np.float32), parts.astype(np.float32), np.ones((n, 3), bool), boxes

    grid = (1e-3, 1.0, 1e3)

    def fitter(c, p, v, b):
        def fit(alphas):
            return P.PartDetector.fit(
                c, p, v, b, ("a", "b", "c"), backbone="x", layer="y", readout="ridge",
                full_centres=c, image_sizes=np.tile([[200.0, 150.0]], (len(c), 1)),
                alphas=grid if alphas is None else alphas, map_type="activation",
            )  # fmt: skip

        return fit

    design = fitter(*data(60))(None)
    chosen = design.box.regression.alpha
    assert len(set(chosen.tolist())) > 1, chosen  # the parts chose different strengths
    fit_b = fitter(*data(50))
    fixed = E._fixed_alphas(fit_b, design)
    for frame in P.FRAMES:
        want = getattr(design, frame).regression.alpha
        got = getattr(fixed, frame).regression
        np.testing.assert_array_equal(got.alpha, want)
        for p, a in enumerate(want):
            direct = getattr(fit_b((float(a),)), frame).regression
            np.testing.assert_allclose(got.coef[p], direct.coef[p])
            np.testing.assert_allclose(got.intercept[p], direct.intercept[p])
