"""Paper 3's CUB setting with a fine-tuned GAP network (issue 18): `fgloc.train.gap_finetune`'s
``start_at`` / mirrored / crop options, `experiments.cam_cub.run_finetuned`, and the
class-disjoint check of both the fine-tuned and the frozen-feature rows."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import pytest
from flax import traverse_util

from experiments import cam_cub, common, configs
from fgloc.models.efficientnet_lite import EfficientNetLite
from fgloc.models.gap import GAPNet
from fgloc.train import gap_finetune


def _lite0_gap(size=32, width=8, classes=3):
    model = GAPNet(EfficientNetLite(), cut="stage5", num_classes=classes, width=width)
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    # jitted here and below: one program per call instead of op-by-op dispatch
    return model, jax.jit(lambda k, x: model.init(k, x))(jax.random.key(0), x), x


def _maps(model, variables, x, layer):
    def fn(m, x):
        return m.backbone.features(x, train=False, stop_at=layer)[1][layer]

    out: Any = jax.jit(lambda v, x: model.apply(v, x, method=fn))(variables, x)
    return out


def test_apply_from_any_start_is_the_whole_network_and_late_params_are_exact():
    model, variables, x = _lite0_gap()
    full: Any = jax.jit(model.apply)(variables, x)
    ref, ref_new = full
    for start in (None, "block9", "stage5"):
        inp = x if start is None else _maps(model, variables, x, start)
        logits, new = jax.jit(
            lambda v, z, start=start: gap_finetune.apply_from(model, v, z, start)
        )(variables, inp)
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(new["pre_pool"], ref_new["pre_pool"], rtol=1e-4, atol=1e-5)
    h9 = _maps(model, variables, x, "block9")
    late = gap_finetune.late_params(model, variables, "block9", (1, *h9.shape[1:]))
    assert {k[1] for k in late} == {"blocks_10"}  # stage5 = blocks 8-10; only block 10 is after
    assert gap_finetune.late_params(model, variables, "stage5", (1, 2, 2, 112)) == set()


def test_augment_uses_cached_mirror_and_crops_windows():
    aug = gap_finetune._augment(flip=True, mirrored=True, crop=2)
    x = np.arange(5 * 5, dtype=np.float32).reshape(5, 5, 1)
    ex = {"input": x, "mirror": -x, "label": np.int32(1)}
    rng = np.random.default_rng(0)
    outs = [aug(ex, rng) for _ in range(40)]
    assert all(o["input"].shape == (3, 3, 1) and o["label"] == 1 for o in outs)
    signs = {float(np.sign(o["input"].sum())) for o in outs}
    assert signs == {1.0, -1.0}  # both the input and its cached mirror
    for o in outs:  # every output is a 3x3 window of the input or of the mirror
        v = o["input"][..., 0]
        src = x[..., 0] if v.sum() > 0 else -x[..., 0]
        i, j = np.argwhere(src == v[0, 0])[0]
        np.testing.assert_array_equal(src[i : i + 3, j : j + 3], v)
    flip_only = gap_finetune._augment(flip=True, mirrored=False, crop=0)
    seen = {flip_only(ex, rng)["input"][0, 0, 0] for _ in range(20)}
    assert seen == {0.0, 4.0}  # x or x[:, ::-1]


def test_finetune_from_start_at_trains_the_late_block_and_new_layers_only(tmp_path):
    model, variables, x = _lite0_gap()
    h9 = np.asarray(_maps(model, variables, x, "block9"))
    inputs = np.concatenate([h9] * 4)
    labels = np.array([0, 1] * 4)
    new, hist = gap_finetune.finetune(
        model, variables, inputs, labels, start_at="block9", mirrored=inputs[:, :, ::-1],
        steps=2, batch_size=4, learning_rate=1e-2, workdir=tmp_path, progress=False,
    )  # fmt: skip
    assert len(hist) == 2
    old: dict[Any, Any] = traverse_util.flatten_dict(variables["params"])
    got: dict[Any, Any] = traverse_util.flatten_dict(new["params"])
    changed = {k[:2] for k in old if not np.array_equal(old[k], got[k])}
    assert ("backbone", "blocks_10") in changed and ("cam_conv", "kernel") in changed
    assert not any(k[0] == "backbone" and k[1] != "blocks_10" for k in changed)
    with pytest.raises(ValueError, match="mirrored has shape"):
        gap_finetune.finetune(model, variables, inputs, labels, start_at="block9",
                              mirrored=inputs[:2], steps=1, batch_size=4)  # fmt: skip
    with pytest.raises(ValueError, match="crop must be"):
        gap_finetune.finetune(model, variables, inputs, labels, start_at="block9", crop=9)


def test_sigterm_mid_finetune_raises_and_the_rerun_resumes(tmp_path, train_step_hook):
    """SIGTERM during the fine-tune: TrainingInterrupted names the workdir and step (not
    half-trained variables returned as finished), and the same call resumes to the
    uninterrupted result."""
    import os
    import signal

    from fgloc.train import trainer

    model, variables, x = _lite0_gap()
    h9 = np.asarray(_maps(model, variables, x, "block9"))
    inputs, labels = np.concatenate([h9] * 4), np.array([0, 1] * 4)
    kw = dict(start_at="block9", steps=4, batch_size=4, learning_rate=1e-2, progress=False,
              checkpoint_every=1)  # fmt: skip
    full, _ = gap_finetune.finetune(model, variables, inputs, labels, workdir=tmp_path / "a", **kw)

    def sigterm_at_2(n):
        if n == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    train_step_hook(sigterm_at_2)
    with pytest.raises(trainer.TrainingInterrupted, match="after step 2 of 4"):
        gap_finetune.finetune(model, variables, inputs, labels, workdir=tmp_path / "b", **kw)
    train_step_hook(None)
    again, hist = gap_finetune.finetune(
        model, variables, inputs, labels, workdir=tmp_path / "b", **kw
    )
    assert len(hist) == 2  # only the remaining steps
    a, b = traverse_util.flatten_dict(full["params"]), traverse_util.flatten_dict(again["params"])
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))


def test_finetuned_presets():
    c = configs.get("cam_cub", "paper_finetuned")
    assert (c.method, c.backbone, c.input_size, c.box.tune) == (
        "finetuned", "efficientnet_lite0", 224, False,
    )  # fmt: skip
    assert c.finetune.start_at == "stage5" and c.finetune.width == 256  # the CPU budget's width
    h = configs.get("cam_cub", "paper_finetuned_head")
    assert (h.input_size, h.finetune.cut, h.finetune.start_at, h.finetune.width) == (
        448, "pre_pool", "stage6", 0,
    )  # fmt: skip
    assert configs.get("cam_cub", "paper_finetuned_head_disjoint").class_disjoint
    assert configs.get("cam_cub", "paper_finetuned_vgg16").finetune.width == 1024
    assert (
        not c.class_disjoint and configs.get("cam_cub", "paper_finetuned_disjoint").class_disjoint
    )
    v = configs.get("cam_cub", "paper_finetuned_vgg16")
    assert (v.backbone, v.finetune.start_at, v.input_size) == ("vgg16_lpips", "pool4", 224)
    d = configs.get("cam_cub", "class_disjoint")
    assert d.method == "frozen" and d.class_disjoint
    assert d.disjoint.design_classes == tuple(range(1, 13))
    assert d.disjoint.score_classes == tuple(range(13, 26))


def _run(shared_data, tmp_path, preset):
    config = f"{common.CONFIG_DIR / 'cam_cub'}.py:{preset}"
    argv = ["--config", config, "--data_dir", str(shared_data), "--workdir", str(tmp_path)]
    common.main(cam_cub.run, argv)
    return json.loads((tmp_path / "metrics.json").read_text())


_KEYS = (
    "box_acc_iou50", "box_acc_iou50_threshold20", "box_acc_iou50_released",
    "box_acc_iou50_gt_known", "cls_acc_full", "cls_acc_cam_crop", "cls_acc_gt_crop",
    "maxboxacc_v2",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.real_data
def test_paper_finetuned_smoke(shared_data, tmp_path):
    """The smoke preset (4 classes, 24 / 24 images at 96, 6x6 CAM) end to end with its
    class-disjoint check (design classes 1-2, score classes 3-4)."""
    m = _run(shared_data, tmp_path, "paper_finetuned_smoke")
    for key in (*_KEYS, "cls_acc_cam_crop_svm", "cls_acc_full_svm"):
        assert 0.0 <= m[f"finetuned_gap_{key}"] <= 1.0, key
        assert 0.0 <= m[f"disjoint.finetuned_gap_{key}"] <= 1.0, key
        if key != "maxboxacc_v2":  # the restriction is of per-image results
            assert 0.0 <= m[f"disjoint.full_run.finetuned_gap_{key}"] <= 1.0, key
    assert m["finetuned_gap_n_images"] == 24 and m["finetuned_gap_map_resolution"] == 6
    assert m["finetuned_gap_threshold"] == 0.2  # the paper's rule, not tuned
    assert m["disjoint.design_threshold"] in (0.1, 0.2, 0.3)
    assert m["disjoint.finetuned_gap_threshold"] == m["disjoint.design_threshold"]
    assert m["disjoint.finetuned_gap_n_classes"] == 2
    assert m["disjoint.design.finetuned_gap_n_classes"] == 2
    folders = sorted(p.name.split("_")[1] for p in tmp_path.glob("finetune_*"))
    assert folders == ["all", "design", "score"]
    assert all((p / "checkpoints").is_dir() for p in tmp_path.glob("finetune_*"))


@pytest.mark.slow
@pytest.mark.real_data
def test_paper_finetuned_vgg16_tiny(shared_data, tmp_path):
    """VGGnet-GAP (lpips VGG16 conv weights) with conv5_* fine-tuned from cached pool4 maps: the
    GPU preset's code path at 64 px on 8 / 8 images."""
    m = _run(shared_data, tmp_path, "paper_finetuned_vgg16_tiny")
    assert m["backbone"] == "vgg16_lpips" and m["finetuned_gap_map_resolution"] == 4
    for key in _KEYS:
        assert 0.0 <= m[f"finetuned_gap_{key}"] <= 1.0, key


@pytest.mark.slow
@pytest.mark.real_data
def test_class_disjoint_smoke(shared_data, tmp_path):
    """The frozen rows' class-disjoint check on 4 classes (design 1-2, score 3-4)."""
    m = _run(shared_data, tmp_path, "class_disjoint_smoke")
    for key in (
        "box_acc_iou50", "cls_acc_full", "cls_acc_cam_crop", "cls_acc_gt_box",
        "imagenet_cam_box_acc_iou50", "combined_cam_box_acc_iou50",
    ):  # fmt: skip
        assert 0.0 <= m[f"disjoint.{key}"] <= 1.0, key
        assert 0.0 <= m[f"disjoint.full_run.{key}"] <= 1.0, key
    assert m["disjoint.imagenet_cam_topk"] in (1, 5) and m["disjoint.svm_c"] == 0.01
    assert m["disjoint.threshold"] in (0.1, 0.2, 0.3)
    n_score_test = m["disjoint.n_images"]
    assert 0 < n_score_test < m["n_images"]
