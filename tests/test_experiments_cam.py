"""experiments.common plumbing, the CAM experiments' helpers, and their smoke runs on real data."""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import cam_class_units, cam_cub, cam_imagenet, choose_cli_defaults, common, configs

# ----------------------------------------------------------------------------- common


_CONFIG_FILE = """
import ml_collections


def get_config(name=None):
    c = ml_collections.ConfigDict()
    c.size = 224
    c.lr = 0.1
    c.name = "a"
    c.flag = False
    c.layers = ("x",)
    c.sub = ml_collections.ConfigDict({"k": 1})
    if name == "smoke":
        c.size = 32
    elif name not in (None, "default"):
        raise ValueError(f"unknown preset {name!r}")
    return c
"""


def _run_fn(config, data_dir, workdir):
    return {"n_images": 2, "value": config.lr * 2, "data": str(data_dir)}


def _config_file(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(_CONFIG_FILE)
    return str(path)


def test_parse_args_types_overrides_by_field(tmp_path, capsys):
    cfg = _config_file(tmp_path)
    argv = ["--config", f"{cfg}:smoke", "--workdir", "w", "--data_dir", str(tmp_path)]
    argv += ["--config.lr=0.5", "--config.flag=true", "--config.layers=('a','b')"]
    argv += ["--config.sub.k=7", "--config.name=5"]
    parsed, data_dir, workdir = common.parse_args(_run_fn, argv)
    config: Any = parsed
    assert (config.size, config.lr, config.flag, config.sub.k) == (32, 0.5, True, 7)
    assert config.layers == ("a", "b") and config.name == "5"  # a str field stays a str
    assert data_dir == tmp_path and str(workdir) == "w"
    config, data_dir, _ = common.parse_args(_run_fn, ["--config", cfg, "--workdir", "w"])
    assert config.size == 224 and str(data_dir) == "../shared/data"  # the default data folder
    for bad, message in (
        (["--config.sze=3"], "Did you mean"),
        (["--config.size=big"], "--config.size=big"),
        (["--bogus=1"], "bogus"),
        (["extra"], "unexpected arguments"),
    ):
        with pytest.raises(SystemExit) as err:
            common.parse_args(_run_fn, ["--config", cfg, "--workdir", "w", *bad])
        assert err.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.parse_args(_run_fn, ["--config", f"{cfg}:nope", "--workdir", "w"])
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.parse_args(_run_fn, ["--config", cfg])
    assert "--workdir is required" in capsys.readouterr().err


def test_apply_overrides_uses_config_flags_typing():
    c: Any = ml_collections.ConfigDict({"a": 1, "t": (1, 2), "s": "x", "sub": {"b": 0.5}})
    assert common.apply_overrides(c, ["a=3", "t=(4,5,6)", "sub.b=2", "s=5"]) is c
    assert (c.a, c.t, c.s, c.sub.b) == (3, (4, 5, 6), "5", 2.0)
    with pytest.raises(AttributeError):
        common.apply_overrides(c, ["zz=3"])


def test_resolve_data_dir_accepts_folder_or_its_parent(tmp_path):
    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    (cub / "images.txt").write_text("1 a.jpg\n")
    assert common.resolve_data_dir(tmp_path, "CUB_200_2011", ("images.txt",)) == cub
    assert common.resolve_data_dir(cub, "CUB_200_2011", ("images.txt",)) == cub
    with pytest.raises(FileNotFoundError, match="no CUB_200_2011 folder"):
        common.resolve_data_dir(tmp_path / "nope", "CUB_200_2011", ("images.txt",))


def test_write_metrics_is_flat_json(tmp_path):
    path = common.write_metrics(tmp_path, {"b": np.float32(0.5), "a": np.int64(3), "c": np.nan})
    assert json.loads(path.read_text()) == {"a": 3, "b": 0.5, "c": None}
    with pytest.raises(TypeError, match="not a scalar"):
        common.write_metrics(tmp_path, {"nested": {"x": 1}})


def test_cached_npz_recomputes_only_when_key_changes(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3) * len(calls)}

    a = common.cached_npz(tmp_path / "c.npz", compute, {"size": 1})
    b = common.cached_npz(tmp_path / "c.npz", compute, {"size": 1})
    c = common.cached_npz(tmp_path / "c.npz", compute, {"size": 2})
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(c["x"], np.arange(3) * 2)
    assert len(calls) == 2


def _cell_compute(calls):
    def compute(rows, cols):
        calls.append((rows.tolist(), cols.tolist()))
        # a (2,)-shaped cell per (row, column): (10 * row + column, row)
        r, c = np.meshgrid(rows, cols, indexing="ij")
        return np.stack([10.0 * r + c, 1.0 * r], -1).astype(np.float32)

    return compute


def test_cached_cells_computes_only_missing_cells(tmp_path):
    calls = []
    path = tmp_path / "c.cells.npz"
    a = common.cached_cells(path, {"k": 1}, [3, 1], [0, 2], _cell_compute(calls))
    assert calls == [([3, 1], [0, 2])]
    np.testing.assert_array_equal(a[..., 0], [[30, 32], [10, 12]])
    # Row 1 is cached for column 2; row 5 and column 7 are new.
    calls.clear()
    b = common.cached_cells(path, {"k": 1}, [1, 5], [7, 2], _cell_compute(calls))
    assert sorted(calls) == [([1], [7]), ([5], [7, 2])]
    np.testing.assert_array_equal(b[..., 0], [[17, 12], [57, 52]])
    np.testing.assert_array_equal(b[..., 1], [[1, 1], [5, 5]])
    # Everything cached now: no compute; a subset in another order comes back in that order.
    calls.clear()
    c = common.cached_cells(path, {"k": 1}, [5, 1], [2, 7], _cell_compute(calls))
    assert calls == []
    np.testing.assert_array_equal(c[..., 0], [[52, 57], [12, 17]])
    # (5, 0) was never asked for: only that cell is computed.
    common.cached_cells(path, {"k": 1}, [5, 3], [2, 0], _cell_compute(calls))
    assert calls == [([5], [0])]
    calls.clear()
    # Another key replaces the file.
    common.cached_cells(path, {"k": 2}, [5], [2], _cell_compute(calls))
    assert calls == [([5], [2])]


def test_cached_cells_resumes_after_an_interruption(tmp_path):
    calls = []
    inner = _cell_compute(calls)

    def failing(rows, cols):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inner(rows, cols)

    path = tmp_path / "c.cells.npz"
    with pytest.raises(KeyboardInterrupt):
        common.cached_cells(path, {"k": 1}, range(7), [4], failing, chunk=3)
    assert calls == [([0, 1, 2], [4]), ([3, 4, 5], [4])]  # two chunks saved before the failure
    calls.clear()
    done = []
    out = common.cached_cells(path, {"k": 1}, range(7), [4], inner, chunk=3, progress=done.append)
    assert calls == [([6], [4])]
    assert done == [6, 1]
    np.testing.assert_array_equal(out[:, 0, 0], 10.0 * np.arange(7) + 4)


def test_cached_cells_rejects_repeated_ids_and_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="rows has repeated ids"):
        common.cached_cells(tmp_path / "c.npz", {}, [1, 1], [0], _cell_compute([]))
    with pytest.raises(ValueError, match=r"compute returned \(1, 1, 2\), want \(2, 1"):
        common.cached_cells(tmp_path / "c.npz", {}, [1, 2], [0], lambda r, c: np.zeros((1, 1, 2)))


def test_main_writes_metrics_and_config(tmp_path):
    cfg = _config_file(tmp_path)
    work = tmp_path / "run"
    out = common.main(_run_fn, ["--config", cfg, "--workdir", str(work), "--data_dir", "d"])
    saved = json.loads((work / "metrics.json").read_text())
    assert saved["value"] == 0.2 and saved["n_images"] == 2 and saved["seconds"] >= 0
    assert out["value"] == 0.2 and saved["data"] == "d"
    assert json.loads((work / "config.json").read_text())["lr"] == 0.1


def test_main_stops_with_143_on_an_interrupted_stage_and_writes_no_metrics(tmp_path, capsys):
    from fgloc.train.trainer import TrainingInterrupted

    def interrupted(config, data_dir, workdir):
        raise TrainingInterrupted(workdir / "stages" / "2_x", 3, 6)

    cfg = _config_file(tmp_path)
    work = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        common.main(interrupted, ["--config", cfg, "--workdir", str(work), "--data_dir", "d"])
    assert err.value.code == 143
    assert "2_x: training stopped by SIGTERM after step 3 of 6" in capsys.readouterr().err
    assert not (work / "metrics.json").exists() and (work / "config.json").is_file()


def test_a_workdir_in_use_by_another_run_is_refused_and_freed_when_it_ends(tmp_path):
    """Two runs in one workdir would race on its caches and stage checkpoints: the second is
    refused with the holder's pid; once the holder is gone the same command runs."""
    import subprocess
    import sys

    work = tmp_path / "run"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, fcntl; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242\\n'); f.flush(); print('held', flush=True); "
         "time.sleep(60)", str(work / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cfg = _config_file(tmp_path)
        argv = ["--config", cfg, "--workdir", str(work), "--data_dir", "d"]
        with pytest.raises(ValueError, match=r"--workdir .*run: another run \(pid 4242\)"):
            common.main(_run_fn, argv)
        assert not (work / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert common.main(_run_fn, argv)["value"] == 0.2
    assert (work / ".lock").read_text().strip() == str(os.getpid())


# ----------------------------------------------------------------------------- CAM helpers


def test_tune_threshold_picks_the_grid_value_that_fits():
    # A pyramid map: the box of `map > t·max` shrinks as t grows; the GT fits t = 0.5.
    yy, xx = np.mgrid[0:20, 0:20]
    m = (10.0 - np.maximum(np.abs(yy - 9.5), np.abs(xx - 9.5)))[None]  # peak 9.5, edges 0.5
    gt = np.array([[5.0, 5.0, 15.0, 15.0]])  # pixels with value > 4.75: the central 10x10
    t, sweep = cam_cub.tune_threshold(m, np.array([[20, 20]]), gt, (0.1, 0.5, 0.9), 20)
    assert t == 0.5 and sweep[0.5] == 1.0 and sweep[0.9] == 0.0


def test_svm_cam_mean_is_the_svm_score_up_to_a_class_constant():
    rs = np.random.default_rng(0)
    n, h, w, k = 30, 3, 4, 6
    maps = {"map_a": rs.normal(size=(n, h, w, 4)), "map_b": rs.normal(size=(n, 2 * h, 2 * w, 2))}
    labels = np.arange(n) % 3
    maps["map_a"][np.arange(n), :, :, labels] += 2.0  # make classes separable
    pooled = np.concatenate([maps["map_a"].mean((1, 2)), maps["map_b"].mean((1, 2))], -1)
    clf = cam_cub.fit_svm(pooled, labels, c=1.0, seed=0)
    weights = cam_cub.svm_raw_weights(clf)
    assert weights.shape == (k, 3)
    for c in range(3):
        cams = cam_cub.svm_cams(maps, ("a", "b"), weights, np.full(n, c))
        assert cams.shape == (n, 2 * h, 2 * w)  # finest layer's grid
        # With one layer the CAM mean is exactly w·pooled; the upsampled coarse layer keeps
        # its mean up to the bilinear edge effect, so compare scores per layer.
        only_b = cam_cub.svm_cams(
            {"map_b": maps["map_b"]}, ("b",), weights[4:], np.full(n, c)
        ).mean((1, 2))
        np.testing.assert_allclose(only_b, pooled[:, 4:] @ weights[4:, c], rtol=1e-4, atol=1e-4)
        direct = pooled @ weights[:, c]
        offset = clf.decision_function(pooled)[:, c] - direct
        np.testing.assert_allclose(offset, offset[0], atol=1e-6)


def test_class_unit_ranking_and_segment():
    w = np.array([[0.1, -1.0], [0.9, 0.2], [0.5, 0.3]])
    np.testing.assert_array_equal(cam_class_units.rank_units(w, 0, 2), [1, 2])
    np.testing.assert_array_equal(cam_class_units.rank_units(w, 1, 3), [2, 1, 0])
    act = np.array([[1.0, 5.0, 0.0], [3.0, 0.0, 2.0]])
    np.testing.assert_array_equal(cam_class_units.top_images(act, 1, 1), [0])
    np.testing.assert_array_equal(cam_class_units.top_images(act, 2, 2), [1, 0])
    a = np.zeros((4, 4), np.float32)
    a[1, 2] = 1.0
    mask, box = cam_class_units.segment_box(a, 4, 0.5)
    np.testing.assert_array_equal(box, [2, 1, 3, 2])
    assert mask.sum() == 1


def test_configs_and_presets():
    for name in ("cam_cub", "cam_imagenet", "cam_class_units", "choose_cli_defaults"):
        default = configs.get(name)
        assert isinstance(default, ml_collections.ConfigDict)
        assert configs.get(name, "default") == default
        with pytest.raises(ValueError, match="unknown preset 'nope'"):
            configs.get(name, "nope")
    for name in ("cam_cub", "cam_imagenet", "cam_class_units"):
        assert configs.get(name, "smoke").input_size < configs.get(name).input_size
    vgg = configs.get("cam_cub", "vgg16")  # a README row: the whole row, no overrides
    assert vgg.cam_layers == ("conv5_3",) and vgg.backbone == "vgg16_lpips"
    assert (vgg.data.max_train, vgg.data.max_test, vgg.crops.enabled) == (150, 150, False)
    big = configs.get("cam_cub", "lite0_576")
    assert (big.input_size, big.crops.enabled) == (576, False)
    assert configs.get("cam_cub", "released").box.rule == "released"
    assert configs.get("cam_imagenet", "native").input_size == 224


def test_readme_commands_fit_on_one_line():
    """Every preset's command line is under 160 characters (issue 14)."""
    names = ("cam_cub", "cam_imagenet", "cam_class_units", "choose_cli_defaults")
    for name in (*names, "sensitivity_corloc"):
        module = __import__(f"experiments.configs.{name}", fromlist=["PRESETS"])
        for preset in module.PRESETS:
            cmd = (
                f"python -m experiments.{name} --config experiments/configs/{name}.py:{preset}"
                " --workdir runs/" + name
            )
            assert len(cmd) < 160, cmd


def test_svm_raw_weights_rejects_nothing_and_cams_check_channels():
    maps = {"map_a": np.zeros((2, 2, 2, 3))}
    with pytest.raises(ValueError, match="3 channels"):
        cam_cub.svm_cams(maps, ("a",), np.zeros((4, 2)), np.zeros(2, int))


# ----------------------------------------------------------------------------- smoke runs


def _run(mod, shared_data, tmp_path, preset="smoke"):
    name = mod.__name__.rsplit(".", 1)[-1]
    config = f"{common.CONFIG_DIR / name}.py:{preset}"
    argv = ["--config", config, "--data_dir", str(shared_data), "--workdir", str(tmp_path)]
    common.main(mod.run, argv)
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.real_data
def test_cam_cub_smoke(shared_data, tmp_path):
    """The smoke preset (5 classes, 150 train / 132 test at 224) end to end, and the README's
    relations on it: classification on CAM-box crops beats the full image (measured 89.4 vs
    85.6 %, 5 of 132 images), and ground-truth-box crops beat it too (91.7 %)."""
    m = _run(cam_cub, shared_data, tmp_path)
    for key in ("box_acc_iou50", "maxboxacc_v2", "cls_acc_full", "cls_acc_cam_crop"):
        assert 0.0 <= m[key] <= 1.0
    assert m["n_images"] == 132 and m["n_train"] == 150 and m["backbone"]
    assert m["cls_acc_cam_crop"] > m["cls_acc_full"], m  # the README's paper-3 target
    assert m["cls_acc_gt_box"] > m["cls_acc_full"], m
    assert 0.0 <= m["combined_cam_box_acc_iou50"] <= 1.0
    assert (tmp_path / "examples.png").stat().st_size > 0
    # A rerun reuses the cached features.
    assert sorted(p.name for p in tmp_path.glob("features_*.npz"))


@pytest.mark.slow
@pytest.mark.real_data
def test_cam_imagenet_smoke(shared_data, tmp_path):
    m = _run(cam_imagenet, shared_data, tmp_path)
    keys = ["top1_cls_err", "top5_cls_err", "top1_loc_err", "top5_loc_err", "gt_known_loc_acc"]
    keys += ["maxboxacc_v2"]
    for key in keys + [f"backprop_{k}" for k in keys if "cls" not in k]:
        assert 0.0 <= m[key] <= 1.0, key
    assert m["top1_loc_err"] >= m["top1_cls_err"]  # a localization hit needs the right class
    assert m["top5_loc_err"] <= m["top1_loc_err"]
    assert m["n_images"] == 6


@pytest.mark.slow
@pytest.mark.real_data
def test_cam_class_units_smoke(shared_data, tmp_path):
    m = _run(cam_class_units, shared_data, tmp_path)
    assert m["n_images"] == 8 and len(m["class_0_units"].split()) == 2
    assert (tmp_path / "class_units.png").stat().st_size > 0


@pytest.mark.parametrize("connectivity", [4, 8])
def test_threshold_sweep_and_test_boxes_agree_exactly(connectivity):
    """The threshold cam_cub chooses on train is scored with the boxes the test split gets:
    the sweep's boxes (tune_threshold) and the final boxes (boxes_in_image) are the same on
    EVERY map, and equal the device rule (boxes_from_maps) on the upsampled maps."""
    import jax

    from fgloc.localize.boxes import boxes_from_maps, boxes_in_image
    from fgloc.maps.resample import resize_maps_host

    rs = np.random.default_rng(1)
    m = rs.random((12, 7, 7)).astype(np.float32) ** 4  # rough maps: diagonal touches, ties
    sizes = np.array([[70, 70]] * 12)
    final = boxes_in_image(m, sizes, 0.3, map_size=14, connectivity=connectivity)
    _, sweep = cam_cub.tune_threshold(m, sizes, final, (0.3,), 14, connectivity)
    assert sweep[0.3] == 1.0  # the sweep's box is the final box on all 12 maps
    up = jnp.asarray(resize_maps_host(m, 14))
    device = jax.jit(lambda x: boxes_from_maps(x, 0.3, connectivity=connectivity))(up)
    np.testing.assert_array_equal(final, np.asarray(device) * 5.0)  # 70 / 14
    # The other connectivity draws other boxes on these maps: the check has teeth.
    other = boxes_in_image(m, sizes, 0.3, map_size=14, connectivity=12 - connectivity)
    _, sweep_other = cam_cub.tune_threshold(m, sizes, other, (0.3,), 14, connectivity)
    assert sweep_other[0.3] < 1.0


def test_topk_imagenet_cam_is_probability_weighted_cam():
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 10)).astype(np.float32)
    logits = rng.normal(size=(3, 10)) * 3
    feats = {"map_pre_pool": fmap, "logits": logits}
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top1 = logits.argmax(1)
    got1 = cam_cub.topk_imagenet_cam(feats, kernel, 1)
    want1 = (
        np.einsum("nhwk,kn->nhw", fmap, kernel[:, top1]) * prob[np.arange(3), top1][:, None, None]
    )
    np.testing.assert_allclose(got1, want1, rtol=1e-5, atol=1e-5)
    got_all = cam_cub.topk_imagenet_cam(feats, kernel, 10)
    np.testing.assert_allclose(
        got_all, np.einsum("nhwk,kc,nc->nhw", fmap, kernel, prob), rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="imagenet_cam_topk"):
        cam_cub.topk_imagenet_cam(feats, kernel, 0)


def test_combine_cams_normalises_clips_and_resizes():
    a = np.zeros((1, 2, 2), np.float32)
    a[0, 0, 0] = 4.0
    a[0, 1, 1] = -3.0  # negative evidence is clipped
    b = np.zeros((1, 4, 4), np.float32)
    b[0, 3, 3] = 0.5
    out = cam_cub.combine_cams(a, b, 2.0)
    assert out.shape == (1, 4, 4)
    assert out.min() >= 0.0
    np.testing.assert_allclose(out[0, 3, 3], 2.0, atol=1e-6)  # b's max -> weight; a is 0 there
    np.testing.assert_allclose(out[0, 0, 0], 1.0, atol=1e-6)  # a's max (corner) -> 1


@pytest.mark.real_data
def test_choose_cli_defaults_smoke(shared_data, tmp_path):
    m = _run(choose_cli_defaults, shared_data, tmp_path)
    assert m["n_images"] == 4 and m["method"] == "cam"
    for key in ("top1_cls_acc", "top1_loc_acc", "top5_loc_acc"):
        assert 0.0 <= m[f"cam_s64_t0.35.{key}"] <= 1.0
    assert m["cam_s64_t0.35.top1_loc_acc"] <= m["cam_s64_t0.35.top1_cls_acc"]
    assert m["cam_s64_t0.35.top5_loc_acc"] >= m["cam_s64_t0.35.top1_loc_acc"]
