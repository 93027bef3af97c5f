"""KeypointFCN and JointClassifier (fgloc.models.keypoint_fcn) on tiny backbones."""

from __future__ import annotations

from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgloc.localize import keypoints as K
from fgloc.localize.coordinate_transfer import coordinate_transfer
from fgloc.models import keypoint_fcn as KF
from fgloc.models.efficientnet_lite import EfficientNetLite


class TinyBackbone(nn.Module):
    """Two stride-2 convs: ``s2`` (stride 2, 8 ch), ``s4`` (stride 4, 16 ch) = ``pre_pool``."""

    def setup(self) -> None:
        self.c1 = nn.Conv(8, (3, 3), strides=2, padding="SAME")
        self.c2 = nn.Conv(16, (3, 3), strides=2, padding="SAME")

    def features(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        del train
        s2 = nn.relu(self.c1(x))
        s4 = nn.relu(self.c2(s2))
        return s4, {"s2": s2, "s4": s4, "pre_pool": s4}

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[None, dict]:
        return None, self.features(x, train)[1]


def _key(seed: int) -> jax.Array:
    """A counter-based "rbg" key: on the shared 2-core CPU, eager threefry initialisers compile
    for seconds per parameter shape, rbg's in about a second."""
    return jax.random.key(seed, impl="rbg")


def _x(b=2, h=32, w=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, h, w, 3)), jnp.float32)


def _apply(model: nn.Module, variables, *args, **kwargs) -> tuple[jax.Array, dict]:
    """``model.apply`` typed as the ``(output, intermediates)`` contract."""
    return cast(tuple[jax.Array, dict], model.apply(variables, *args, **kwargs))


def _without_backbone(variables):
    return {"params": {k: v for k, v in variables["params"].items() if k != "backbone"}}


def test_fuse_features_upsamples_coarse_to_fine_and_concatenates():
    rng = np.random.default_rng(1)
    fine = jnp.asarray(rng.normal(size=(2, 8, 6, 3)), jnp.float32)
    coarse = jnp.asarray(rng.normal(size=(2, 4, 3, 5)), jnp.float32)
    out = KF.fuse_features([coarse, fine])
    assert out.shape == (2, 8, 6, 8)
    np.testing.assert_array_equal(np.asarray(out[..., 5:]), np.asarray(fine))
    up = jax.image.resize(coarse, (2, 8, 6, 5), "bilinear")
    np.testing.assert_allclose(np.asarray(out[..., :5]), np.asarray(up))
    # half-pixel centres: a constant-along-rows ramp stays linear inside the map
    ramp = jnp.broadcast_to(jnp.arange(4.0)[None, :, None, None], (1, 4, 3, 1))
    r = np.asarray(KF.fuse_features([ramp, jnp.zeros((1, 8, 6, 1))]))[0, :, 0, 0]
    np.testing.assert_allclose(r[1:-1], (np.arange(1, 7) + 0.5) / 2 - 0.5)
    with pytest.raises(ValueError, match="at least one"):
        KF.fuse_features([])


def test_keypoint_fcn_shapes_fusion_and_gradients():
    model = KF.KeypointFCN(
        TinyBackbone(), layers=("s2", "s4"), num_parts=15, head=((32, 3), (8, 1))
    )
    x = _x()
    variables = model.init(_key(0), x)
    logits, inter = _apply(model, variables, x)
    assert logits.shape == (2, 16, 12, 15)  # the finer (stride 2) grid
    assert inter["fused"].shape == (2, 16, 12, 8 + 16)
    assert inter["head"].shape == (2, 16, 12, 8)
    np.testing.assert_array_equal(np.asarray(inter["heatmaps"]), np.asarray(logits))
    fused = KF.fuse_features([inter["s2"], inter["s4"]])
    np.testing.assert_allclose(np.asarray(inter["fused"]), np.asarray(fused))
    # paper loss: gradients reach both the head and the backbone
    kp = jnp.asarray(np.random.default_rng(2).uniform(0, 24, size=(2, 15, 2)), jnp.float32)
    vis = jnp.ones((2, 15), bool)

    def loss(params):
        z, _ = _apply(model, {"params": params}, x)
        return K.keypoint_loss(z, kp, vis, stride=2)

    g = jax.jit(jax.grad(loss))(variables["params"])
    for name in ("backbone", "head_convs_0", "score"):
        norm = sum(float(jnp.abs(a).sum()) for a in jax.tree_util.tree_leaves(g[name]))
        assert np.isfinite(norm) and norm > 0, name
    # jit == eager
    zj, _ = cast(tuple[jax.Array, dict], jax.jit(model.apply)(variables, x))
    np.testing.assert_allclose(np.asarray(zj), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_keypoint_fcn_from_cached_features_equals_end_to_end():
    model = KF.KeypointFCN(TinyBackbone(), layers=("s4",), num_parts=4, head=(), score_bias_init=-3)
    x = _x(seed=3)
    variables = model.init(_key(1), x)
    logits, inter = _apply(model, variables, x)
    assert logits.shape == (2, 8, 6, 4)
    np.testing.assert_allclose(np.asarray(variables["params"]["score"]["bias"]), -3.0)
    cached = {"s4": inter["s4"]}  # e.g. frozen features written to disk
    head_only = KF.KeypointFCN(None, layers=("s4",), num_parts=4, head=(), score_bias_init=-3)
    z2, own = _apply(
        head_only, _without_backbone(variables), cached, method=head_only.from_features
    )
    np.testing.assert_allclose(np.asarray(z2), np.asarray(logits), rtol=1e-6)
    assert set(own) == {"fused", "head", "heatmaps"}
    with pytest.raises(ValueError, match="s4"):
        _apply(
            head_only,
            _without_backbone(variables),
            {"s4x": inter["s4"]},
            method=head_only.from_features,
        )


def test_keypoint_fcn_on_efficientnet_lite0_stage5_stage7():
    model = KF.KeypointFCN(EfficientNetLite("lite0"), layers=KF.LITE0_LAYERS, head=((16, 1),))
    x = _x(b=1, h=64, w=64)
    # Compiling Lite0's random initialisers takes ~20 s on 2 cores; shapes + filled values and one
    # compiled forward take a few seconds. Values in [0.01, 0.1] keep BatchNorm variances > 0.
    shapes = jax.eval_shape(model.init, _key(0), x)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.uniform(0.01, 0.1, s.shape), s.dtype), shapes
    )
    logits, inter = cast(tuple[jax.Array, dict], jax.jit(model.apply)(variables, x))
    assert inter["stage5"].shape == (1, 4, 4, 112) and inter["stage7"].shape == (1, 2, 2, 320)
    assert inter["fused"].shape == (1, 4, 4, 432)
    assert logits.shape == (1, 4, 4, 15)


def test_keypoint_fcn_validation():
    x = _x()
    with pytest.raises(ValueError, match="not among"):
        KF.KeypointFCN(TinyBackbone(), layers=("stage5",)).init(_key(0), x)
    with pytest.raises(ValueError, match="backbone=None"):
        KF.KeypointFCN(None).init(_key(0), x)


@pytest.mark.parametrize("holistic", ["gap", "ts", "none"])
def test_joint_classifier_shapes_and_masking(holistic):
    hol_layer = None if holistic == "none" else "s4"
    kind = "gap" if holistic == "none" else holistic
    model = KF.JointClassifier(
        num_classes=7,
        backbone=TinyBackbone(),
        part_layer="s2",
        holistic_layer=hol_layer,
        holistic=kind,
        bilinear_dim=64,
    )
    x = _x(seed=4)
    rng = np.random.default_rng(5)
    kp = jnp.asarray(rng.uniform(0, 24, size=(2, 5, 2)), jnp.float32)
    vis = jnp.asarray([[True, False, True, True, False], [True, True, True, True, True]])
    variables = model.init(_key(0), x, kp, vis)
    logits, inter = _apply(model, variables, x, kp, vis)
    hdim = {"gap": 16, "ts": 64, "none": 0}[holistic]
    assert logits.shape == (2, 7)
    assert inter["parts"].shape == (2, 5, 8)
    assert inter["joint"].shape == (2, 5 * 8 + hdim)
    # invisible parts are zeros in the joint feature; visible ones are the coordinate transfer
    parts = np.asarray(inter["parts"])
    assert np.all(parts[0, 1] == 0) and np.all(parts[0, 4] == 0)
    ref, _ = coordinate_transfer(inter["s2"], K.pixels_to_cells(kp, 2.0), vis)
    np.testing.assert_allclose(parts, np.asarray(ref), rtol=1e-6)
    # moving an invisible part changes nothing
    kp2 = kp.at[0, 1].set(jnp.asarray([1.0, 1.0]))
    np.testing.assert_allclose(np.asarray(_apply(model, variables, x, kp2, vis)[0]), logits)
    if holistic == "ts":
        norms = np.linalg.norm(np.asarray(inter["holistic"]), axis=-1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    # from cached maps with cell coordinates == end to end
    head_only = model.clone(backbone=None)
    cached = {"s2": inter["s2"], "s4": inter["s4"]}
    z2, _ = _apply(
        head_only,
        _without_backbone(variables),
        cached,
        K.pixels_to_cells(kp, 2.0),
        vis,
        method=head_only.from_features,
    )
    np.testing.assert_allclose(np.asarray(z2), np.asarray(logits), rtol=1e-5, atol=1e-6)


def test_joint_classifier_gradients_reach_part_features_only_where_pooled():
    model = KF.JointClassifier(num_classes=3, part_layer="s2", holistic_layer=None, pool_size=1)
    f = jnp.asarray(np.random.default_rng(6).normal(size=(1, 6, 6, 4)), jnp.float32)
    cells = jnp.asarray([[[1.0, 2.0], [4.0, 4.0]]])
    vis = jnp.asarray([[True, False]])
    variables = model.init(_key(0), {"s2": f}, cells, vis, method=model.from_features)

    def score(fm):
        z, _ = _apply(model, variables, {"s2": fm}, cells, vis, method=model.from_features)
        return z[0, 0]

    g = np.asarray(jax.grad(score)(f))
    nz = np.argwhere(np.abs(g).sum(-1) > 0)
    np.testing.assert_array_equal(nz, [[0, 2, 1]])  # only the visible part's cell (row 2, col 1)


def test_joint_classifier_validation():
    x = _x()
    kp, vis = jnp.zeros((2, 3, 2)), jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match="holistic"):
        KF.JointClassifier(backbone=TinyBackbone(), holistic="vlad").init(_key(0), x, kp, vis)
    with pytest.raises(ValueError, match="part_layer"):
        KF.JointClassifier(backbone=TinyBackbone(), part_layer="conv5_3").init(_key(0), x, kp, vis)
