"""Staged training recipe (fgloc.train.keypoints): each stage's smoke run on synthetic maps,
resume after an interruption equals the uninterrupted run, finished stages are skipped, stage /
backbone / option mismatches are clear errors; `start_at` on the backbones."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from fgloc.models.efficientnet_lite import EfficientNetLite
from fgloc.models.keypoint_fcn import JointClassifier, KeypointFCN
from fgloc.models.layers import run_stages
from fgloc.train import keypoints as st
from fgloc.train import trainer

P = 15


def _maps(n=8, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 4, 4, 6)).astype(np.float32)
    b = rng.normal(size=(n, 2, 2, 5)).astype(np.float32)
    kp = rng.uniform(2, 30, size=(n, P, 2)).astype(np.float32)
    vis = rng.random((n, P)) < 0.8
    vis[0] = False  # an image with no visible keypoint
    return {"a": a, "b": b, "keypoints": kp, "visible": vis}


def _head_stage(tmp_path, steps, name="s1", **kw):
    model = KeypointFCN(layers=("a", "b"), head=((4, 1),), num_parts=P)
    arrays = _maps()
    sample = {k: jnp.asarray(arrays[k][:1]) for k in ("a", "b")}
    params = model.init(jax.random.key(0), sample, method=model.from_features)["params"]
    info = st.StageInfo.make("keypoints", "fake_net", ("a", "b"), 32, {"steps": steps})
    return st.train_stage(
        tmp_path / name,
        info,
        params=params,
        frozen={},
        loss_fn=st.keypoint_loss_fn(model, stride=8.0, kind=kw.pop("kind", "softmax_gaussian")),
        tx=st.make_optimizer(1e-2, steps),
        arrays=arrays,
        batch_size=kw.pop("batch_size", 2),
        num_steps=steps,
        checkpoint_every=2,
        progress=False,
        num_devices=1,
        **kw,
    )


def _leaves_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_stage1_smoke_files_and_skip(tmp_path):
    res = _head_stage(tmp_path, 4)
    d = tmp_path / "s1"
    info = json.loads((d / "stage.json").read_text())
    assert info["stage"] == "keypoints" and info["backbone"] == "fake_net"
    assert info["layers"] == ["a", "b"] and info["input_size"] == 32
    assert len(info["config_digest"]) == 64
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["peak_hit"] <= 1 for r in lines)
    assert json.loads((d / "done.json").read_text())["steps"] == 4
    again = _head_stage(tmp_path, 4)  # finished: restored, not retrained
    assert again.seconds == 0.0 and len(again.history) == 4
    _leaves_equal(res.params, again.params)
    with pytest.raises(st.StageMismatchError, match="config_digest"):
        _head_stage(tmp_path, 6)  # another configuration in the same folder


def test_interrupted_stage_resumes_to_the_uninterrupted_result(tmp_path, train_step_hook):
    full = _head_stage(tmp_path, 6, "full")

    def die_after_3(n):
        if n > 3:
            raise KeyboardInterrupt  # killed after 3 steps (checkpoint at step 2)

    train_step_hook(die_after_3)
    with pytest.raises(KeyboardInterrupt):
        _head_stage(tmp_path, 6, "cut")
    assert not (tmp_path / "cut" / "done.json").exists()
    train_step_hook(None)
    resumed = _head_stage(tmp_path, 6, "cut")
    assert json.loads((tmp_path / "cut" / "done.json").read_text())["resumed_from_step"] == 2
    _leaves_equal(full.params, resumed.params)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]  # the redone step 3 is logged once


def test_sigterm_mid_stage_is_not_a_finished_stage(tmp_path, train_step_hook):
    """SIGTERM during a stage: `fit` saves and returns early; the stage then raises
    TrainingInterrupted (naming the folder and the step) instead of going on with half-trained
    weights, writes no done.json, and the same call again resumes to the uninterrupted result
    (found in a run that went on after SIGTERM and marked its stage finished)."""
    import os
    import signal

    full = _head_stage(tmp_path, 6, "full")

    def sigterm_at_3(n):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by fit: stop after this step

    train_step_hook(sigterm_at_3)
    with pytest.raises(trainer.TrainingInterrupted, match=r"cut: training stopped by SIGTERM "
                       r"after step 3 of 6") as err:  # fmt: skip
        _head_stage(tmp_path, 6, "cut")
    assert err.value.step == 3 and err.value.num_steps == 6
    assert not (tmp_path / "cut" / "done.json").exists()
    assert not (tmp_path / "cut" / "final.npz").exists()
    train_step_hook(None)
    resumed = _head_stage(tmp_path, 6, "cut")
    assert json.loads((tmp_path / "cut" / "done.json").read_text())["resumed_from_step"] == 3
    _leaves_equal(full.params, resumed.params)


def test_load_stage_checks_stage_backbone_and_shapes(tmp_path):
    res = _head_stage(tmp_path, 2)
    params, info = st.load_stage(
        tmp_path / "s1", res.params, stage="keypoints", backbone="fake_net"
    )
    _leaves_equal(params, res.params)
    assert info.layers == ("a", "b")
    with pytest.raises(st.StageMismatchError, match="stage 'keypoints'.*expected 'classifier'"):
        st.load_stage(tmp_path / "s1", res.params, stage="classifier")
    with pytest.raises(st.StageMismatchError, match="backbone 'fake_net'.*'vgg16_lpips'"):
        st.load_stage(tmp_path / "s1", res.params, stage="keypoints", backbone="vgg16_lpips")
    with pytest.raises(st.StageMismatchError, match="input_size"):
        st.load_stage(tmp_path / "s1", res.params, stage="keypoints", input_size=64)
    wrong = jax.tree_util.tree_map(lambda a: np.zeros((*a.shape, 2)), res.params)
    with pytest.raises(st.StageMismatchError, match="score"):
        st.load_stage(tmp_path / "s1", wrong, stage="keypoints")
    with pytest.raises(FileNotFoundError, match="no finished stage"):
        st.load_stage(tmp_path / "nothing", res.params, stage="keypoints")


def test_stage_order_and_options_are_checked():
    s1 = st.StageInfo.make("keypoints", "net", ("a",), 32, {})
    s3 = st.StageInfo.make("classifier", "net", ("a",), 32, {})
    ft = st.StageInfo.make("keypoints_finetune", "net", ("a",), 32, {"lr": 1}, parent=s1)
    assert ft.parent == s1.config_digest
    assert (
        ft.config_digest
        != st.StageInfo.make(
            "keypoints_finetune", "net", ("a",), 32, {"lr": 2}, parent=s1
        ).config_digest
    )
    with pytest.raises(st.StageMismatchError, match="must start from a 'keypoints' stage"):
        st.StageInfo.make("keypoints_finetune", "net", ("a",), 32, {}, parent=s3)
    with pytest.raises(st.StageMismatchError, match="backbone 'other'.*'net'"):
        st.StageInfo.make("keypoints_finetune", "other", ("a",), 32, {}, parent=s1)
    with pytest.raises(st.StageMismatchError, match="input size 64"):
        st.StageInfo.make("keypoints_finetune", "net", ("a",), 64, {}, parent=s1)
    with pytest.raises(ValueError, match="starts from a 'classifier' stage"):
        st.StageInfo.make("classifier_finetune", "net", ("a",), 32, {})
    with pytest.raises(ValueError, match="stage must be one of"):
        st.StageInfo.make("stage5", "net", ("a",), 32, {})
    with pytest.raises(ValueError, match="multiple of the 2 devices"):
        st.check_batch_size(3, 10, num_devices=2)
    with pytest.raises(ValueError, match="exceeds the 4 training"):
        st.check_batch_size(8, 4, num_devices=1)
    with pytest.raises(ValueError, match="loss kind"):
        st.keypoint_loss_fn(KeypointFCN(layers=("a",)), stride=8, kind="mse")
    with pytest.raises(ValueError, match="needs a KeypointFCN with a backbone"):
        st.keypoint_loss_fn(KeypointFCN(layers=("a",)), stride=8, start_at="stage6")
    with pytest.raises(ValueError, match="flip probability"):
        st.flip_pair_transform({"a": "a_flip"}, 1.5)


def test_stage_dir_of_another_stage_is_refused(tmp_path):
    _head_stage(tmp_path, 2)
    model = JointClassifier(num_classes=3)
    x = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    from fgloc.train.keypoints import _joint_forward

    params = model.init(
        jax.random.key(0),
        {"joint": jnp.asarray(x[:1])},
        None,
        None,
        None,
        False,
        method=_joint_forward,
    )["params"]
    info = st.StageInfo.make("classifier", "fake_net", ("a",), 32, {})
    with pytest.raises(st.StageMismatchError, match="stage: 'keypoints' .*'classifier'"):
        st.train_stage(
            tmp_path / "s1",
            info,
            params=params,
            frozen={},
            loss_fn=st.classifier_loss_fn(model),
            tx=st.make_optimizer(1e-2, 2),
            arrays={"joint": x, "label": np.arange(4) % 3},
            batch_size=2,
            num_steps=2,
            progress=False,
            num_devices=1,
        )


def test_classifier_stages_fixed_joint_and_through_the_coordinate_transfer(tmp_path):
    """Stage 3 on a fixed joint vector equals JointClassifier.from_features; stage 4 trains
    through the coordinate transfer and changes only the classifier (no backbone here)."""
    from fgloc.train.keypoints import _joint_forward

    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 1, size=(8, 4, 4, 3)).astype(np.float32)
    kp = rng.uniform(0, 32, size=(8, P, 2)).astype(np.float32)
    vis = rng.random((8, P)) < 0.7
    labels = np.arange(8) % 2
    model = JointClassifier(num_classes=2, part_layer="m", holistic_layer="m")
    cells = (kp / 8.0 - 0.5).astype(np.float32)
    v = model.init(
        jax.random.key(0), {"m": maps[:1]}, cells[:1], vis[:1], method=model.from_features
    )
    logits, inter = model.apply(v, {"m": maps}, cells, vis, method=model.from_features)
    fixed = model.apply(
        v, {"joint": inter["joint"]}, None, None, None, False, method=_joint_forward
    )
    np.testing.assert_allclose(fixed, logits, rtol=1e-5, atol=1e-5)
    through = model.apply(
        v,
        {"m": maps, "keypoints": kp, "visible": vis},
        None,
        None,
        8.0,
        False,
        method=_joint_forward,
    )
    np.testing.assert_allclose(through, logits, rtol=1e-5, atol=1e-5)
    loss_fn = st.classifier_loss_fn(model, part_stride=8.0)
    loss, m = loss_fn(
        v["params"],
        {},
        {"m": maps, "keypoints": kp, "visible": vis, "label": labels},
        jax.random.key(0),
    )
    assert np.isfinite(float(loss)) and 0 <= float(m["accuracy"]) <= 1
    info3 = st.StageInfo.make("classifier", "fake", ("m",), 32, {})
    info4 = st.StageInfo.make("classifier_finetune", "fake", ("m",), 32, {}, parent=info3)
    res = st.train_stage(
        tmp_path / "s4",
        info4,
        params=v["params"],
        frozen={},
        loss_fn=loss_fn,
        tx=st.make_optimizer(1e-2, 3),
        arrays={"m": maps, "keypoints": kp, "visible": vis, "label": labels},
        batch_size=4,
        num_steps=3,
        progress=False,
        num_devices=1,
    )
    assert set(res.params) == {"classifier"}
    assert json.loads((tmp_path / "s4/stage.json").read_text())["parent"] == info3.config_digest


def test_flip_pair_transform_swaps_whole_examples():
    t = st.flip_pair_transform({"x": "x_flip", "k": "k_flip"}, probability=1.0)
    ex = {"x": 1, "x_flip": 2, "k": 3, "k_flip": 4, "label": 5}
    assert t(ex, np.random.default_rng(0)) == {"x": 2, "k": 4, "label": 5}
    t0 = st.flip_pair_transform({"x": "x_flip", "k": "k_flip"}, probability=0.0)
    assert t0(ex, np.random.default_rng(0)) == {"x": 1, "k": 3, "label": 5}


def test_split_merge_round_trip():
    params = {"backbone": {"a": {"k": 1}, "b": {"k": 2}}, "head": {"k": 3}}
    late, early = st.split_params(params, lambda p: p[0] != "backbone" or p[1] == "b")
    assert late == {"backbone": {"b": {"k": 2}}, "head": {"k": 3}}
    assert st.merge_params(late, early) == params


# ----------------------------------------------------------------------------- start_at
@pytest.fixture(scope="module")
def lite0():
    model = EfficientNetLite("lite0")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
    inter = jax.jit(lambda v, x: model.apply(v, x, method=model.features)[1])(variables, x)
    return model, variables, x, inter


def test_start_at_resumes_the_trunk_exactly(lite0):
    model, variables, x, full = lite0
    late = jax.jit(
        lambda v, h: model.apply(v, h, False, None, start_at="stage6", method=model.features)
    )(variables, full["stage6"])
    out, inter = late
    assert set(inter) == {"stage6", "block15", "stage7", "pre_pool"}
    np.testing.assert_allclose(inter["stage7"], full["stage7"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, full["pre_pool"], rtol=1e-5, atol=1e-5)
    head, inter = model.apply(
        variables, full["stage7"], False, None, start_at="stage7", method=model.features
    )
    np.testing.assert_allclose(head, full["pre_pool"], rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="no layer 'stage9' \\(start_at\\)"):
        model.apply(variables, x, start_at="stage9", method=model.features)
    with pytest.raises(ValueError, match="comes before start_at"):
        model.apply(variables, x, False, "stage3", start_at="stage6", method=model.features)


def test_late_backbone_params_are_exactly_the_layers_run(lite0):
    model, variables, _, _ = lite0
    late, early = st.late_backbone_params(model, variables, "stage6", "stage7", (1, 2, 2, 192))
    assert set(late) == {"blocks_15"}
    assert "blocks_14" in early and "head_conv" in early and "stem_conv" in early
    late, _ = st.late_backbone_params(model, variables, "stage7", None, (1, 2, 2, 320))
    assert set(late) == {"head_conv", "head_bn"}


def test_keypoint_finetune_loss_trains_only_late_layers(lite0):
    """Stage 2's loss from cached stage6/stage5 maps: gradients reach block 15 and the head."""
    model, variables, _, inter = lite0
    fcn = KeypointFCN(backbone=model, layers=("stage5", "stage7"), head=((4, 1),))
    head = fcn.init(
        jax.random.key(1), {k: inter[k] for k in ("stage5", "stage7")}, method=fcn.from_features
    )["params"]
    late, early = st.late_backbone_params(
        model, variables, "stage6", "stage7", inter["stage6"].shape
    )
    params = {**head, "backbone": late}
    frozen = {"params": {"backbone": early}, "batch_stats": {"backbone": variables["batch_stats"]}}
    loss_fn = st.keypoint_loss_fn(
        fcn, stride=16.0, kind="softmax_cell", start_at="stage6", stop_at="stage7"
    )
    batch = {
        "stage5": inter["stage5"],
        "stage6": inter["stage6"],
        "keypoints": jnp.full((1, P, 2), 20.0),
        "visible": jnp.ones((1, P), bool),
    }
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, frozen, batch, jax.random.key(0)
    )
    assert np.isfinite(float(loss))
    g = traverse_util.flatten_dict(grads)
    assert any(k[:2] == ("backbone", "blocks_15") for k in g)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g.values())
    assert float(jnp.abs(grads["backbone"]["blocks_15"]["project_conv"]["kernel"]).sum()) > 0


def test_run_stages_start_at():
    stages = [("a", lambda h: h + 1), ("b", lambda h: h * 2), ("c", lambda h: h - 3)]
    out, inter = run_stages(jnp.asarray(5.0), stages, None, "toy", start_at="a")
    assert float(out) == 7.0 and set(inter) == {"a", "b", "c"}
    out, inter = run_stages(jnp.asarray(5.0), stages, "b", "toy", start_at="a")
    assert float(out) == 10.0 and set(inter) == {"a", "b"}
    with pytest.raises(KeyError, match="toy has no layer 'z' \\(start_at\\)"):
        run_stages(jnp.asarray(0.0), stages, None, "toy", start_at="z")
    with pytest.raises(ValueError, match="comes before start_at"):
        run_stages(jnp.asarray(0.0), stages, "a", "toy", start_at="b")
