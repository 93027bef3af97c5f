"""fgloc.maps.normalize and fgloc.maps.smooth: hand cases, numpy == JAX, jit == eager."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from fgloc.maps import gaussian_blur, max_normalize, minmax_normalize


def test_minmax_normalize_hand_case_constant_maps_and_array_types():
    m = np.array([[[1.0, 3.0], [5.0, 2.0]], [[4.0, 4.0], [4.0, 4.0]]])  # second: constant
    out = minmax_normalize(m)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out[0], [[0.0, 0.5], [1.0, 0.25]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))
    j = minmax_normalize(jnp.asarray(m, jnp.float32))
    assert isinstance(j, jax.Array)
    np.testing.assert_allclose(np.asarray(j), out, atol=1e-7)
    np.testing.assert_allclose(np.asarray(jax.jit(minmax_normalize)(jnp.asarray(m))), out)
    # Over other axes: (h, w, B) maps normalised per trailing index.
    np.testing.assert_allclose(minmax_normalize(np.moveaxis(m, 0, -1), axes=(0, 1))[..., 0], out[0])


def test_max_normalize_clips_negative_evidence():
    m = np.array([[[-2.0, 1.0], [4.0, 0.0]], [[-1.0, -3.0], [-2.0, 0.0]]])  # second: no positive
    out = max_normalize(m)
    np.testing.assert_allclose(out[0], [[0.0, 0.25], [1.0, 0.0]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))
    np.testing.assert_allclose(np.asarray(max_normalize(jnp.asarray(m))), out)


def test_gaussian_blur_matches_scipy_and_keeps_mass_inside():
    rng = np.random.default_rng(0)
    m = rng.random((2, 3, 31, 29)).astype(np.float32)
    sigma = 2.0
    got = np.asarray(jax.jit(gaussian_blur, static_argnums=1)(jnp.asarray(m), sigma))
    # The same truncated, normalised kernel with zero padding: scipy's gaussian_filter with
    # truncate = r / sigma (r = 6) and mode="constant".
    want = ndimage.gaussian_filter(
        m.astype(np.float64), sigma=(0, 0, sigma, sigma), truncate=6 / sigma, mode="constant"
    )
    np.testing.assert_allclose(got, want, atol=2e-6)
    delta = np.zeros((1, 41, 41), np.float32)
    delta[0, 20, 20] = 1.0
    np.testing.assert_allclose(float(gaussian_blur(jnp.asarray(delta), 3.0).sum()), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(gaussian_blur(jnp.asarray(m), 0.0)), m)
