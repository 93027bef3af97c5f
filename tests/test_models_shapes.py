"""Shapes without running: ``jax.eval_shape`` of every model, and of every model/converter pair.

Parameter totals are checked against torchvision's documented counts (``num_params`` in the
weights' metadata), so a wrong channel count anywhere fails here, not in a long parity run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_module

from fgloc.models.alexnet import AlexNet
from fgloc.models.efficientnet_lite import EfficientNetLite
from fgloc.models.googlenet import GoogLeNet
from fgloc.models.resnet import ResNet, ResNet50
from fgloc.models.vgg import VGG16
from fgloc.weights.io import flatten
from weights_conversion import torchvision as tv

# torchvision's documented parameter counts (GoogLeNet: without the training-only aux heads).
TORCHVISION_NUM_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "googlenet": 6_624_904,
    "resnet50": 25_557_032,
}


def _shapes(model, size, **kw):
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = tv.model_template(model)
    logits, inter = jax.eval_shape(lambda v, x: model.apply(v, x, **kw), variables, x)
    return variables, logits, {k: tuple(a.shape) for k, a in inter.items()}


@pytest.mark.parametrize("arch", sorted(TORCHVISION_NUM_PARAMS))
def test_parameter_counts_match_torchvision(arch):
    variables = tv.model_template(tv.ARCHITECTURES[arch](1000))
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
    assert n == TORCHVISION_NUM_PARAMS[arch]


def test_alexnet_shapes():
    _, logits, inter = _shapes(AlexNet(), 224)
    assert logits.shape == (2, 1000)
    assert inter["conv5"] == (2, 13, 13, 256)
    assert inter["pool5"] == inter["pre_pool"] == (2, 6, 6, 256)
    assert inter["fc7"] == (2, 1, 1, 4096)
    _, logits, inter = _shapes(AlexNet(num_classes=None), 227)
    assert logits is None and inter["pool5"] == (2, 6, 6, 256) and "fc6" not in inter
    _, logits, _ = _shapes(AlexNet(fully_conv=True), 355)  # pool5 10x10 -> 5x5 positions
    assert logits.shape == (2, 5, 5, 1000)


def test_vgg16_shapes():
    _, logits, inter = _shapes(VGG16(), 224)
    assert logits.shape == (2, 1000)
    assert inter["conv5_3"] == (2, 14, 14, 512)
    assert inter["pool5"] == (2, 7, 7, 512)
    assert inter["fc6"] == inter["fc7"] == (2, 1, 1, 4096)
    _, logits, inter = _shapes(VGG16(fully_conv=True), 320)  # pool5 10x10 -> 4x4
    assert logits.shape == (2, 4, 4, 1000)
    _, logits, inter = _shapes(VGG16(), 64)  # adaptive pool lifts 2x2 to 7x7
    assert logits.shape == (2, 1000) and inter["pool5"] == (2, 2, 2, 512)


@pytest.mark.parametrize("variant", ["torchvision", "bvlc"])
def test_googlenet_shapes(variant):
    _, logits, inter = _shapes(GoogLeNet(variant=variant), 224)
    assert logits.shape == (2, 1000)
    assert inter["pool1"] == (2, 56, 56, 64)  # ceil mode: 112 -> 56
    assert inter["inception3b"] == (2, 28, 28, 480)
    assert inter["inception4e"] == (2, 14, 14, 832)
    assert inter["pool4"] == (2, 7, 7, 832)
    assert inter["pre_pool"] == (2, 7, 7, 1024) and inter["pooled"] == (2, 1024)


def test_googlenet_cam_shapes_and_names():
    variables, logits, inter = _shapes(GoogLeNet(variant="bvlc", cam=True), 224)
    assert logits.shape == (2, 1000)
    assert inter["cam_conv"] == inter["pre_pool"] == (2, 14, 14, 1024)
    assert "inception5a" not in inter and "batch_stats" not in variables
    p = variables["params"]
    assert p["inception3a"]["branch3_1"]["conv"]["kernel"].shape == (5, 5, 16, 32)  # real 5x5
    assert p["conv1"]["conv"]["bias"].shape == (64,)
    assert p["classifier"]["kernel"].shape == (1024, 1000)
    with pytest.raises(ValueError, match="variant='bvlc'"):
        GoogLeNet(cam=True).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_resnet50_shapes():
    variables, logits, inter = _shapes(ResNet50(), 224)
    assert logits.shape == (2, 1000)
    assert inter["stem"] == (2, 56, 56, 64)
    assert [inter[f"layer{i}"] for i in range(1, 5)] == [
        (2, 56, 56, 256),
        (2, 28, 28, 512),
        (2, 14, 14, 1024),
        (2, 7, 7, 2048),
    ]
    assert inter["pooled"] == (2, 2048)
    assert variables["batch_stats"]["layer4_0"]["downsample_1"]["mean"].shape == (2048,)


@pytest.mark.torch
@pytest.mark.parametrize("arch", sorted(tv.ARCHITECTURES))
def test_converter_shapes_line_up(arch):
    """torchvision's state-dict shapes (a model on the meta device: no memory, no compute)
    pass through ``convert_flat`` under ``jax.eval_shape`` onto exactly the Flax template."""
    torch = require_module("torch", "pip install '.[torchvision]'")
    torchvision = require_module("torchvision", "pip install '.[torchvision]'")
    builders = {
        "vgg16": torchvision.models.vgg16,
        "alexnet": torchvision.models.alexnet,
        "googlenet": lambda: torchvision.models.googlenet(init_weights=False),
        "resnet50": torchvision.models.resnet50,
    }
    with torch.device("meta"):
        state = builders[arch]().state_dict()
    structs = {k: jax.ShapeDtypeStruct(tuple(v.shape), jnp.float32) for k, v in state.items()}
    template = tv.model_template(tv.ARCHITECTURES[arch](1000))
    converted = jax.eval_shape(lambda sd: tv.convert_flat(arch, sd, template), structs)
    want = {k: tuple(v.shape) for k, v in flatten(template).items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    assert got == want


def test_alexnet_pool_is_differentiable():
    """Channel-gradient maps (paper 1) need reverse-mode AD through the ceil-mode max pools."""
    import fgloc

    p = fgloc.pretrained("alexnet_lpips")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 67, 67, 3)), jnp.float32)

    def f(z):
        return p.model.apply(p.variables, z)[1]["pool5"][..., 3].sum()

    # jitted: one program each instead of op-by-op dispatch of the whole network
    g = jax.jit(jax.grad(f))(x)
    assert g.shape == x.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0
    # Finite-difference check along the gradient direction (piecewise-linear network).
    d = g / jnp.linalg.norm(g)
    eps = 1e-3
    fj = jax.jit(f)
    fd = (fj(x + eps * d) - fj(x - eps * d)) / (2 * eps)
    np.testing.assert_allclose(fd, jnp.vdot(g, d), rtol=2e-2)


@pytest.mark.parametrize(
    ("make", "layer", "size"),
    [
        (lambda: AlexNet(num_classes=None), "conv3", 67),
        (lambda: VGG16(num_classes=None), "pool2", 32),
        (lambda: EfficientNetLite(variant="lite0", num_classes=5), "stage4", 64),
        (lambda: EfficientNetLite(variant="lite0", num_classes=5), "block3", 64),
        (lambda: ResNet(stage_sizes=(1, 1), num_classes=None), "layer1", 64),
    ],
)
def test_layer_output_stops_early_and_matches_the_full_trunk(make, layer, size):
    """The model contract: ``features(x, stop_at=L)`` computes nothing past ``L`` (fewer
    intermediates, no later layer) and gives the same ``L`` as the full trunk."""
    from fgloc.models.layers import layer_output

    model = make()
    x = jax.random.normal(jax.random.key(0), (1, size, size, 3))
    # jitted, the three calls in one program (instead of op-by-op dispatch); a jitted dict
    # comes back with sorted keys, so the order the layers ran in is recorded while tracing
    variables = jax.jit(lambda k, x: model.init(k, x, method=model.features))(jax.random.key(1), x)
    order: list[str] = []

    def calls(v, x):
        _, full = model.apply(v, x, method=model.features)
        out, part = model.apply(v, x, False, layer, method=model.features)
        order.extend(part)
        return full, out, part, layer_output(model, v, x, layer)

    full, out, part, got = jax.jit(calls)(variables, x)
    assert order[-1] == layer and len(part) < len(full)
    np.testing.assert_allclose(out, full[layer], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, full[layer], rtol=1e-6)
    with pytest.raises(KeyError, match="no layer 'nope'"):
        layer_output(model, variables, x, "nope")
