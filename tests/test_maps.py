"""Map operators against analytic fixtures with exact expected maps (fgloc.maps)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_path

from fgloc.maps import (
    argmax_xy,
    channel_gradient_maps,
    class_activation_maps,
    resize_maps,
    sensitivity_maps,
    top_classes,
)

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- CAM


def test_cam_hand_computed():
    # features (1, 2, 2, K=2); class_weights (K=2, C=3)
    f = np.zeros((1, 2, 2, 2), np.float32)
    f[0, :, :, 0] = [[1, 2], [3, 4]]
    f[0, :, :, 1] = [[0, 1], [0, -1]]
    w = np.array([[1.0, 0.0, 2.0], [10.0, 1.0, -1.0]], np.float32)
    cams = class_activation_maps(jnp.asarray(f), jnp.asarray(w), jnp.array([[2, 0]]))
    # class 2: 2*f0 - f1 ; class 0: f0 + 10*f1
    expected = np.array([[[[2, 3], [6, 9]], [[1, 12], [3, -6]]]], np.float32)
    np.testing.assert_array_equal(np.asarray(cams), expected)


def test_cam_mean_is_logit_jit_and_vmap():
    f = jnp.asarray(RNG.normal(size=(3, 5, 4, 6)).astype(np.float32))
    w = jnp.asarray(RNG.normal(size=(6, 10)).astype(np.float32))
    logits = f.mean(axis=(1, 2)) @ w
    classes = top_classes(logits, 4)
    np.testing.assert_array_equal(np.asarray(classes), np.argsort(-np.asarray(logits))[:, :4])
    cams = class_activation_maps(f, w, classes)
    assert cams.shape == (3, 4, 5, 4)
    np.testing.assert_allclose(
        np.asarray(cams.mean(axis=(2, 3))),
        np.take_along_axis(np.asarray(logits), np.asarray(classes), axis=1),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(jax.jit(class_activation_maps)(f, w, classes)), np.asarray(cams), atol=1e-6
    )
    per_example = jax.vmap(lambda fi, ci: class_activation_maps(fi[None], w, ci[None])[0])(
        f, classes
    )
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(cams), atol=1e-6)


def test_cam_bad_input():
    f = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match="class_weights"):
        class_activation_maps(f, jnp.zeros((4, 5)), jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(ValueError, match="classes"):
        class_activation_maps(f, jnp.zeros((3, 5)), jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(TypeError, match="classes"):
        class_activation_maps(f, jnp.zeros((3, 5)), jnp.zeros((1, 1)))


@pytest.mark.real_data
def test_cam_on_authors_googlenet_features(shared_data):
    """The CAM authors' GoogLeNet-CAM weights and pre-extracted activations (metalbubble/CAM)."""
    import scipy.io as io

    ref = require_path(shared_data / "cam_reference")
    net = io.loadmat(str(ref / "cam_googlenet_data_net.mat"))
    img = io.loadmat(str(ref / "cam_googlenet_data_img1.mat"))
    w = net["weights_LR"].astype(np.float32)  # (1024, 1000)
    act = img["activation_lastconv"].astype(np.float32)  # MATLAB (w, h, K, crops)
    scores = img["scores"].reshape(1000, 10)  # softmax per crop
    feats = jnp.asarray(act.transpose(3, 1, 0, 2))  # (10, 14, 14, 1024)
    logits = feats.mean(axis=(1, 2)) @ w
    top1 = int(np.argmax(scores.mean(axis=1)))
    assert int(np.argmax(np.asarray(logits).mean(axis=0))) == top1
    classes = jnp.full((10, 1), top1, jnp.int32)
    cams = np.asarray(class_activation_maps(feats, jnp.asarray(w), classes))
    # returnCAMmap.m: reshape (w*h, K) column-major, times weights, back to (w, h).
    matlab = np.stack(
        [
            (act[:, :, :, i].reshape(-1, 1024, order="F") @ w[:, top1]).reshape(14, 14, order="F")
            for i in range(10)
        ]
    )
    np.testing.assert_allclose(cams[:, 0], matlab.transpose(0, 2, 1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(cams.mean(axis=(2, 3))[:, 0], np.asarray(logits)[:, top1], rtol=1e-4)


def test_resize_maps_bilinear_half_pixel():
    m = jnp.array([[[0.0, 1.0]]])  # (1, 1, 2)
    out = resize_maps(m, (1, 4))
    np.testing.assert_allclose(np.asarray(out), [[[0.0, 0.25, 0.75, 1.0]]], atol=1e-6)
    const = resize_maps(jnp.full((2, 3, 7, 7), 3.0), (32, 20))
    assert const.shape == (2, 3, 32, 20)
    np.testing.assert_allclose(np.asarray(const), 3.0, atol=1e-5)
    with pytest.raises(ValueError, match="size"):
        resize_maps(m, (0, 4))


# --------------------------------------------------------------------------- sensitivity


def _analytic_logits(x):
    """S_0 = Σ 5 x_r + x_g²,  S_1 = Σ x_b x_r,  S_2 = Σ x_g  (sums over pixels)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    s0 = jnp.sum(5 * r + g**2, axis=(1, 2))
    s1 = jnp.sum(b * r, axis=(1, 2))
    s2 = jnp.sum(g, axis=(1, 2))
    return jnp.stack([s0, s1, s2], axis=-1)


def _analytic_grads(x):
    """(B, 3 classes, H, W, 3) exact gradients of `_analytic_logits`."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    z = np.zeros_like(r)
    g0 = np.stack([np.full_like(r, 5.0), 2 * g, z], -1)
    g1 = np.stack([b, z, r], -1)
    g2 = np.stack([z, np.ones_like(r), z], -1)
    return np.stack([g0, g1, g2], axis=1)


@pytest.mark.parametrize(
    ("reduce", "fn"),
    [
        ("max", lambda a: np.abs(a).max(-1)),
        ("l2", lambda a: np.sqrt((a**2).sum(-1))),
        ("sum", lambda a: np.abs(a).sum(-1)),
        (None, lambda a: a),
    ],
)
def test_sensitivity_analytic(reduce, fn):
    x = RNG.normal(size=(2, 4, 5, 3)).astype(np.float32)
    classes = np.array([[1, 0], [2, 1]], np.int32)
    out = sensitivity_maps(_analytic_logits, jnp.asarray(x), jnp.asarray(classes), reduce=reduce)
    full = _analytic_grads(x)
    expected = np.stack([full[b, classes[b]] for b in range(2)])
    np.testing.assert_allclose(np.asarray(out), fn(expected), rtol=1e-6, atol=1e-6)


def test_sensitivity_jit_and_per_example():
    x = jnp.asarray(RNG.normal(size=(3, 6, 6, 3)).astype(np.float32))
    kernel = jnp.asarray(RNG.normal(size=(3, 3, 3, 4)).astype(np.float32))
    dense = jnp.asarray(RNG.normal(size=(4, 7)).astype(np.float32))

    def logits_fn(img):
        h = jax.lax.conv_general_dilated(
            img, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.tanh(h).mean(axis=(1, 2)) @ dense

    classes = top_classes(logits_fn(x), 3)
    out = sensitivity_maps(logits_fn, x, classes)
    jitted = jax.jit(functools.partial(sensitivity_maps, logits_fn))(x, classes)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(out), rtol=1e-5, atol=1e-7)
    for b in range(3):
        single = sensitivity_maps(logits_fn, x[b : b + 1], classes[b : b + 1])
        np.testing.assert_allclose(np.asarray(single[0]), np.asarray(out[b]), atol=1e-6)
        grad = jax.grad(lambda im, b=b: logits_fn(im[None])[0, classes[b, 1]])(x[b])
        np.testing.assert_allclose(
            np.asarray(out[b, 1]), np.abs(np.asarray(grad)).max(-1), atol=1e-6
        )


def test_sensitivity_bad_input():
    with pytest.raises(ValueError, match="reduce"):
        sensitivity_maps(
            _analytic_logits, jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 1), jnp.int32), "l1"
        )
    with pytest.raises(ValueError, match="classes"):
        sensitivity_maps(_analytic_logits, jnp.zeros((1, 2, 2, 3)), jnp.zeros((2,), jnp.int32))


# --------------------------------------------------------------------------- channel gradients


def _conv_features(kernel):
    def feature_fn(x):
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    return feature_fn


def _conv_channel_grads(kernel, H, W):
    """Closed form: ∂ Σ_{i,j} f_k / ∂ x[y, x, c] = Σ_{a,b} K[a,b,c,k] · [(y-a, x-b) valid]."""
    kh, kw, _, K = kernel.shape
    ho, wo = H - kh + 1, W - kw + 1
    out = np.zeros((K, H, W, 3), np.float64)
    for a in range(kh):
        for b in range(kw):
            out[:, a : a + ho, b : b + wo, :] += kernel[a, b].T[:, None, None, :]
    return out


def test_channel_gradients_linear_conv_closed_form():
    kernel = RNG.normal(size=(3, 2, 3, 5)).astype(np.float32)
    x = jnp.asarray(RNG.normal(size=(2, 7, 6, 3)).astype(np.float32))
    expected = _conv_channel_grads(kernel, 7, 6)  # (K, H, W, 3), same for every image
    fn = _conv_features(jnp.asarray(kernel))
    signed = channel_gradient_maps(fn, x, reduce=None, chunk_size=2)
    assert signed.shape == (2, 5, 7, 6, 3)
    np.testing.assert_allclose(
        np.asarray(signed), np.broadcast_to(expected, signed.shape), atol=1e-5
    )
    l2 = channel_gradient_maps(fn, x, channels=jnp.array([4, 1]), chunk_size=1)
    np.testing.assert_allclose(
        np.asarray(l2[0]), np.sqrt((expected[[4, 1]] ** 2).sum(-1)), rtol=1e-5, atol=1e-6
    )


def _pointwise_features(x):
    """f_0 = 5 r + g², f_1 = b · r, f_2 = 0 · r (per pixel, h = H)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    return jnp.stack([5 * r + g**2, b * r, 0 * r], axis=-1)


def test_channel_gradients_nonlinear_analytic_and_chunking():
    x = jnp.asarray(RNG.normal(size=(3, 5, 4, 3)).astype(np.float32))
    xn = np.asarray(x)
    r, g, b = xn[..., 0], xn[..., 1], xn[..., 2]
    z = np.zeros_like(r)
    expected = np.stack(
        [
            np.stack([np.full_like(r, 5.0), 2 * g, z], -1),
            np.stack([b, z, r], -1),
            np.zeros_like(xn),
        ],
        axis=1,
    )  # (B, K, H, W, 3)
    ref = np.abs(expected).sum(-1)
    for chunk in (1, 2, 3, 64):
        for loop in ("unroll", "scan"):
            out = channel_gradient_maps(
                _pointwise_features, x, chunk_size=chunk, reduce="sum", loop=loop
            )
            np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    for loop in ("auto", "unroll", "scan"):  # traced channel ids, a ragged last chunk
        fn = functools.partial(
            channel_gradient_maps, _pointwise_features, chunk_size=2, reduce="sum", loop=loop
        )
        jitted = jax.jit(fn)(x, jnp.array([2, 0, 1]))
        np.testing.assert_allclose(np.asarray(jitted), ref[:, [2, 0, 1]], rtol=1e-6, atol=1e-6)
    for i in range(3):
        single = channel_gradient_maps(_pointwise_features, x[i : i + 1], reduce="sum")
        np.testing.assert_allclose(np.asarray(single[0]), ref[i], rtol=1e-6, atol=1e-6)


def test_channel_gradients_map_fn_on_device():
    kernel = RNG.normal(size=(3, 3, 3, 6)).astype(np.float32)
    x = jnp.asarray(RNG.normal(size=(2, 9, 8, 3)).astype(np.float32))

    def feature_fn(img):
        return jnp.tanh(
            _conv_features(jnp.asarray(kernel))(img)
        )  # nonlinear: maps differ per image

    maps = np.asarray(channel_gradient_maps(feature_fn, x, chunk_size=4))
    xy = channel_gradient_maps(feature_fn, x, chunk_size=4, map_fn=argmax_xy)
    assert xy.shape == (2, 6, 2) and xy.dtype == jnp.int32
    flat = maps.reshape(2, 6, -1).argmax(-1)
    np.testing.assert_array_equal(np.asarray(xy), np.stack([flat % 8, flat // 8], -1))
    # a pytree-valued map_fn
    stats = channel_gradient_maps(
        feature_fn, x, chunk_size=4, map_fn=lambda m: {"max": m.max(), "sum": m.sum()}
    )
    np.testing.assert_allclose(np.asarray(stats["max"]), maps.max(axis=(2, 3)), rtol=1e-6)


def test_channel_gradients_bad_input():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 3\)"):
        channel_gradient_maps(_pointwise_features, x, channels=np.array([0, 3]))
    with pytest.raises(ValueError, match="chunk_size"):
        channel_gradient_maps(_pointwise_features, x, chunk_size=0)
    with pytest.raises(ValueError, match="loop must be one of"):
        channel_gradient_maps(_pointwise_features, x, loop="while")
    with pytest.raises(ValueError, match="feature_fn"):
        channel_gradient_maps(lambda im: im.sum(axis=(1, 2)), x)
