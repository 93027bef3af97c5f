"""fgloc.models.gap: the CAM paper's GAP variants (Zhou et al. 2016, Sec. 3.1) and fine-tuning."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fgloc.maps.cam import class_activation_maps
from fgloc.models import gap
from fgloc.models.alexnet import AlexNet
from fgloc.models.efficientnet_lite import EfficientNetLite
from fgloc.models.vgg import VGG16
from fgloc.train import gap_finetune


class ToyBackbone(nn.Module):
    """Two strided convs; ``features`` returns ``(conv2, {"conv1", "conv2"})``."""

    @nn.compact
    def features(self, x, train=False, stop_at=None):
        del train
        h1 = nn.Conv(4, (3, 3), strides=2, name="conv1")(x)
        if stop_at == "conv1":
            return h1, {"conv1": h1}
        h2 = nn.Conv(6, (3, 3), strides=2, name="conv2")(nn.relu(h1))
        return h2, {"conv1": h1, "conv2": h2}


def _init(model, shape=(2, 16, 16, 3), seed=0):
    x = jax.random.normal(jax.random.key(seed + 1), shape)
    return model.init(jax.random.key(seed), x), x


def test_gap_without_new_layer_is_gap_plus_linear_and_cam_mean_is_logit():
    model = gap.GAPNet(ToyBackbone(), cut="conv1", num_classes=3, width=None)
    variables, x = _init(model)
    logits, inter = model.apply(variables, x)
    h = np.asarray(inter["conv1"])
    assert inter["pre_pool"].shape == (2, 8, 8, 4)
    k = np.asarray(variables["params"]["classifier"]["kernel"])
    b = np.asarray(variables["params"]["classifier"]["bias"])
    logits = np.asarray(logits)
    np.testing.assert_allclose(logits, h.mean(axis=(1, 2)) @ k + b, rtol=1e-5, atol=1e-6)
    # CAM (paper eq. 2): spatial mean of M_c is the pre-bias class score.
    cams = class_activation_maps(
        inter["pre_pool"], jnp.asarray(k), jnp.array([[0, 1, 2], [2, 1, 0]])
    )
    cams = np.asarray(cams)
    np.testing.assert_allclose(cams[0].mean(axis=(1, 2)), logits[0] - b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        cams[1].mean(axis=(1, 2)), (logits[1] - b)[::-1], rtol=1e-4, atol=1e-5
    )


def test_added_layer_is_3x3_stride1_pad1_conv_with_relu():
    model = gap.GAPNet(ToyBackbone(), cut="conv2", num_classes=5, width=7)
    variables, x = _init(model)
    _, inter = model.apply(variables, x)
    h = np.asarray(inter["cut"], np.float64)  # (2, 4, 4, 6)
    w = np.asarray(variables["params"]["cam_conv"]["kernel"], np.float64)  # (3, 3, 6, 7)
    bias = np.asarray(variables["params"]["cam_conv"]["bias"], np.float64)
    ref = np.zeros((2, 4, 4, 7))
    for o in range(7):  # reference: zero-padded cross-correlation summed over input channels
        for i in range(6):
            ref[..., o] += ndimage.correlate(
                h[..., i], w[None, :, :, i, o], mode="constant", cval=0.0
            )
    ref = np.maximum(ref + bias, 0.0)
    assert inter["pre_pool"].shape == (2, 4, 4, 7)  # stride 1, pad 1: resolution kept
    np.testing.assert_allclose(inter["pre_pool"], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(inter["pooled"], ref.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    # `features` gives the same CAM map; `head` on pooled gives the logits.
    fmap, _ = model.apply(variables, x, method=model.features)
    np.testing.assert_allclose(fmap, inter["pre_pool"], rtol=1e-6)
    logits = model.apply(variables, inter["pooled"], method=model.head)
    np.testing.assert_allclose(logits, inter["logits"], rtol=1e-6)


def test_unknown_cut_names_the_available_ones():
    model = gap.GAPNet(ToyBackbone(), cut="conv9", num_classes=2)
    with pytest.raises(KeyError, match=r"conv9.*available: \['conv1', 'conv2'\]"):
        _init(model)


@pytest.mark.parametrize(
    ("backbone", "cut", "size", "hw", "channels"),
    [
        (VGG16(num_classes=None), "conv5_3", 224, 14, 512),  # paper: VGGnet-GAP 14x14
        (AlexNet(num_classes=None), "conv5", 224, 13, 256),  # paper: AlexNet-GAP 13x13
        (EfficientNetLite("lite0"), "stage5", 224, 14, 112),
        (EfficientNetLite("lite0"), "stage5", 448, 28, 112),
    ],
)
def test_mapping_resolution_of_default_cuts(backbone, cut, size, hw, channels):
    """Shapes only via `eval_shape` (no FLOPs); the numbers are the paper's Sec. 3.1 values."""
    model = gap.GAPNet(backbone, cut=cut, num_classes=1000)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    logits, inter = jax.eval_shape(model.apply, variables, x)
    assert inter["cut"].shape == (1, hw, hw, channels)
    assert inter["pre_pool"].shape == (1, hw, hw, 1024)
    assert logits.shape == (1, 1000)
    assert variables["params"]["cam_conv"]["kernel"].shape == (3, 3, channels, 1024)


def _toy_data(n=32, size=16, seed=0):
    """A bright 4x4 blob at a random place: red for class 0, green for class 1."""
    rs = np.random.default_rng(seed)
    x = rs.normal(0, 0.1, size=(n, size, size, 3)).astype(np.float32)
    y = np.arange(n) % 2
    for i in range(n):
        r = rs.integers(2, size - 6)
        c = rs.integers(2, size - 6)
        x[i, r : r + 4, c : c + 4, y[i]] += 2.0
    return x, y


@pytest.mark.slow
def test_finetune_learns_trains_only_new_layers_and_checkpoints(tmp_path):
    model = gap.GAPNet(ToyBackbone(), cut="conv1", num_classes=2, width=8)
    variables, _ = _init(model, (1, 16, 16, 3))
    x, y = _toy_data()
    # Frozen backbone: train the new layers on cached cut features.
    feats = gap_finetune.cut_features(model, variables, jnp.asarray(x), batch_size=8)
    new, hist = gap_finetune.finetune(
        model,
        variables,
        feats,
        y,
        on_cut_features=True,
        steps=40,
        batch_size=16,
        learning_rate=3e-2,
        flip=False,
        workdir=tmp_path,
        progress=False,
    )
    assert len(hist) == 40
    assert np.mean([h["loss"] for h in hist[-5:]]) < 0.5 * np.mean([h["loss"] for h in hist[:5]])
    logits, _ = model.apply(new, x)  # the full model (images in) uses the trained layers
    assert np.mean(np.argmax(logits, -1) == y) >= 0.95
    old_bb = jax.tree.leaves(variables["params"]["backbone"])
    for a, b in zip(old_bb, jax.tree.leaves(new["params"]["backbone"]), strict=True):
        np.testing.assert_array_equal(a, b)  # frozen
    old_k = variables["params"]["cam_conv"]["kernel"]
    assert not np.allclose(new["params"]["cam_conv"]["kernel"], old_k)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == ["40"]
    # Training on images gives the same first step as on cached cut features.
    _, hist_img = gap_finetune.finetune(
        model, variables, x, y, steps=1, batch_size=16, flip=False, progress=False
    )
    np.testing.assert_allclose(hist_img[0]["loss"], hist[0]["loss"], rtol=1e-5)


def test_finetune_train_backbone_prefix_unfreezes_those_layers():
    model = gap.GAPNet(ToyBackbone(), cut="conv2", num_classes=2, width=4)
    variables, _ = _init(model, (1, 16, 16, 3))
    x, y = _toy_data(16)
    new, _ = gap_finetune.finetune(
        model, variables, x, y, train_backbone=("conv2",), steps=3, batch_size=8,
        learning_rate=1e-2, progress=False,
    )  # fmt: skip
    bb_old, bb_new = variables["params"]["backbone"], new["params"]["backbone"]
    np.testing.assert_array_equal(bb_old["conv1"]["kernel"], bb_new["conv1"]["kernel"])
    assert not np.allclose(bb_old["conv2"]["kernel"], bb_new["conv2"]["kernel"])
    with pytest.raises(ValueError, match="labels must be in"):
        gap_finetune.finetune(model, variables, x, y + 5, steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="on_cut_features"):
        gap_finetune.finetune(
            model, variables, x, y, on_cut_features=True, train_backbone=("conv2",)
        )


def test_gap_variant_of_embedded_lite0_reproduces_its_classifier():
    """With ``cut="pre_pool"``, ``width=None`` and the pretrained classifier copied in, the GAP
    variant is exactly EfficientNet-Lite0 (which is natively GAP + linear)."""
    from fgloc.pretrained import pretrained

    v = gap_finetune.gap_variant("efficientnet_lite0", 1000, cut="pre_pool", width=None)
    p = pretrained("efficientnet_lite0")
    params = {**v.variables["params"], "classifier": p.variables["params"]["classifier"]}
    variables = {**v.variables, "params": params}
    x = p.preprocess(np.random.default_rng(0).integers(0, 256, (1, 96, 96, 3)))
    # jitted: one program per network instead of op-by-op dispatch
    logits, inter = jax.jit(v.model.apply)(variables, x)
    ref, ref_inter = jax.jit(p.model.apply)(p.variables, x)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inter["pre_pool"], ref_inter["pre_pool"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no default cut"):
        gap_finetune.gap_variant("resnet50")
