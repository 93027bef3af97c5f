"""The hand-written input gradients of issue 17: `torch_max_pool` and `strided_conv`.

Each ``custom_vjp`` is checked against autodiff's own rule on the same forward function (the
reference), with ties, padding and ``ceil_mode``; ``vmap`` over cotangents against one call per
cotangent; ``jit`` against eager; forward outputs bit-identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fgloc.models import layers as L

POOLS = [  # kernel, stride, padding, ceil_mode, (H, W)
    (3, 2, 0, False, (13, 13)),
    (3, 2, 0, True, (14, 15)),
    (2, 2, 0, False, (8, 8)),
    (3, 1, 1, True, (7, 9)),
    (3, 2, 1, False, (10, 11)),
]


def _plain_pool(x, k, s, p, ceil_mode):
    pads = tuple(L._torch_pool_pad(x.shape[a], k, s, p, ceil_mode) for a in (1, 2))
    return L._max_pool_forward(x, k, s, pads)  # autodiff's rule (select_and_scatter_add)


@pytest.mark.parametrize(("k", "s", "p", "ceil_mode", "hw"), POOLS)
def test_max_pool_vjp_matches_autodiff(k, s, p, ceil_mode, hw) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, 3)), jnp.float32)
    y, vjp = jax.vjp(lambda z: L.torch_max_pool(z, k, s, p, ceil_mode), x)
    y_ref, vjp_ref = jax.vjp(lambda z: _plain_pool(z, k, s, p, ceil_mode), x)
    np.testing.assert_array_equal(y, y_ref)
    cts = jnp.asarray(rng.normal(size=(3, *y.shape)), jnp.float32)
    want = np.stack([vjp_ref(c)[0] for c in cts])
    np.testing.assert_allclose(vjp(cts[0])[0], want[0], atol=1e-6)
    batched = jax.jit(jax.vmap(lambda c: vjp(c)[0]))(cts)  # vmap == one call each, jit == eager
    np.testing.assert_allclose(batched, want, atol=1e-6)


def test_max_pool_ties_go_to_the_first_maximum() -> None:
    # A 3 x 3 window of equal values: torch routes the gradient to the first (row-major) one.
    g = jax.grad(lambda z: L.torch_max_pool(z, 3, 2).sum())(jnp.ones((1, 3, 3, 1)))
    want = np.zeros((3, 3))
    want[0, 0] = 1.0
    np.testing.assert_array_equal(g[0, :, :, 0], want)
    # Two overlapping windows (stride 2 < kernel 3) sharing their maximum: both cotangents land.
    x = jnp.zeros((1, 3, 5, 1)).at[0, 1, 2, 0].set(5.0)
    g = jax.grad(
        lambda z: (L.torch_max_pool(z, 3, 2) * jnp.array([2.0, 3.0])[None, None, :, None]).sum()
    )(x)
    assert float(g[0, 1, 2, 0]) == 5.0 and float(jnp.abs(g).sum()) == 5.0


CONVS = [  # (H, W), kernel, stride, padding, C, O
    ((71, 67), 11, 4, ((2, 2), (2, 2)), 3, 8),  # AlexNet conv1
    ((17, 19), 3, 2, ((1, 1), (0, 1)), 5, 4),
    ((16, 16), 7, 2, ((3, 3), (3, 3)), 3, 8),  # ResNet stem
    ((9, 10), 2, 2, ((0, 0), (0, 0)), 2, 3),
    ((13, 13), 5, 3, ((0, 0), (1, 0)), 2, 3),  # rows no window reaches
]


@pytest.mark.parametrize(("hw", "k", "s", "pads", "c", "o"), CONVS)
def test_strided_conv_matches_lax(hw, k, s, pads, c, o) -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, *hw, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=dn)

    def new(x, w):
        return L.strided_conv(x, w, (s, s), list(pads), dimension_numbers=dn)

    y = new(x, w)
    np.testing.assert_array_equal(y, ref(x, w))  # the forward pass is lax.conv itself
    scale = float(jnp.abs(y).max())
    np.testing.assert_allclose(L.space_to_depth_conv(x, w, s, pads), y, atol=1e-5 * scale)
    ct = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    (dx, dw), (dx_ref, dw_ref) = jax.vjp(new, x, w)[1](ct), jax.vjp(ref, x, w)[1](ct)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-5 * float(jnp.abs(dx_ref).max()))
    np.testing.assert_array_equal(dw, dw_ref)  # the kernel gradient is autodiff's
    cts = jnp.stack([ct, -2.0 * ct])
    _, vjp = jax.vjp(lambda z: new(z, w), x)
    batched = jax.jit(jax.vmap(lambda c: vjp(c)[0]))(cts)
    np.testing.assert_allclose(batched[1], -2.0 * dx_ref, atol=2e-5 * float(jnp.abs(dx_ref).max()))


def test_strided_conv_passes_other_convolutions_through() -> None:
    x = jnp.ones((1, 8, 8, 4))
    w = jnp.ones((3, 3, 2, 6))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    for kwargs in (
        {"window_strides": (1, 1), "padding": "SAME"},  # stride 1
        {"window_strides": (2, 2), "padding": "SAME"},  # string padding
        {"window_strides": (2, 1), "padding": ((1, 1), (1, 1))},  # unequal strides
    ):
        got = L.strided_conv(x, w, dimension_numbers=dn, feature_group_count=2, **kwargs)
        want = lax.conv_general_dilated(x, w, dimension_numbers=dn, feature_group_count=2, **kwargs)
        np.testing.assert_array_equal(got, want)
