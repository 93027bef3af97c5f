"""Bilinear / compact bilinear pooling (fgloc.models.bilinear): kernels, sketches, sqrt, module."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgloc.models import bilinear as BL


def _maps(seed: int, b: int = 2, n: int = 4, c: int = 24) -> np.ndarray:
    """Post-ReLU-like local descriptors ``(B, 2, n/2, C)``."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(b, 2, n // 2, c)), 0.0).astype(np.float32)


def _kernel(x: np.ndarray, y: np.ndarray) -> float:
    """``Σ_{n,m} ⟨x_n, y_m⟩²`` for descriptor sets ``(N, C)``."""
    return float(np.sum((x.astype(np.float64) @ y.T.astype(np.float64)) ** 2))


def _apply(mod: BL.CompactBilinear, variables, x) -> jax.Array:
    out = mod.apply(variables, x)
    assert isinstance(out, jax.Array)
    return out


def test_full_bilinear_is_sum_of_outer_products_and_its_kernel():
    x = _maps(0)
    got = np.asarray(BL.full_bilinear(x))
    xs = x.reshape(2, -1, x.shape[-1]).astype(np.float64)
    ref = np.stack([np.einsum("nc,nd->cd", xs[b], xs[b]).ravel() for b in range(2)])
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert float(got[0] @ got[1]) == pytest.approx(_kernel(xs[0], xs[1]), rel=1e-5)
    with pytest.raises(ValueError, match="x must be"):
        BL.full_bilinear(np.zeros(3))


def test_count_sketch_and_tensor_sketch_match_explicit_formulas():
    rng = np.random.default_rng(1)
    c, d = 10, 7
    x = rng.normal(size=(2, 3, c)).astype(np.float32)
    h1, s1, h2, s2 = (np.asarray(a) for a in BL.tensor_sketch_hashes(3, c, d))
    assert h1.min() >= 0 and h1.max() < d and set(np.unique(s1)) <= {-1.0, 1.0}
    ref = np.zeros((2, 3, d))
    for ci in range(c):
        ref[..., h1[ci]] += s1[ci] * x[..., ci]
    for impl in ("segment", "dense"):
        np.testing.assert_allclose(
            np.asarray(BL.count_sketch(x, h1, s1, d, impl)), ref, rtol=1e-5, atol=1e-6
        )
    # TS: φ[k] = Σ_n Σ_{i,j: h1(i)+h2(j) ≡ k (mod d)} s1(i) s2(j) x_ni x_nj (circular convolution)
    ts_ref = np.zeros((2, d))
    for i in range(c):
        for j in range(c):
            k = (h1[i] + h2[j]) % d
            ts_ref[:, k] += s1[i] * s2[j] * np.sum(x[..., i] * x[..., j], axis=1)
    got = np.asarray(BL.tensor_sketch(x, h1, s1, h2, s2, d))
    np.testing.assert_allclose(got, ts_ref, rtol=1e-4, atol=1e-5)
    released = np.asarray(BL.tensor_sketch(x, h1, s1, h2, s2, d, scale="released"))
    np.testing.assert_allclose(released, d * ts_ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="impl"):
        BL.count_sketch(x, h1, s1, d, impl="fft")
    with pytest.raises(ValueError, match="h, s"):
        BL.count_sketch(x, h1[:3], s1[:3], d)


def test_random_maclaurin_matches_formula_and_scales():
    x = _maps(2)
    w1, w2 = (np.asarray(w) for w in BL.random_maclaurin_weights(0, 24, 64))
    assert np.allclose(np.abs(w1), 64**-0.25) and np.allclose(np.abs(w2), 64**-0.25)
    xs = x.reshape(2, -1, 24).astype(np.float64)
    ref = np.sum((xs @ w1) * (xs @ w2), axis=1)
    got = np.asarray(BL.random_maclaurin(x, w1, w2))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    r1, _ = BL.random_maclaurin_weights(0, 24, 64, scale="released")
    np.testing.assert_allclose(np.asarray(r1), w1 * 64**-0.25, rtol=1e-6)  # same signs, 1/√d
    per_pos = BL.random_maclaurin(x, w1, w2, sum_pool=False)
    assert per_pos.shape == (2, 2, 2, 64)
    with pytest.raises(ValueError, match="w1, w2"):
        BL.random_maclaurin(x, w1[:5], w2[:5])
    with pytest.raises(ValueError, match="scale"):
        BL.random_maclaurin_weights(0, 24, 64, scale="none")
    with pytest.raises(ValueError, match="dim"):
        BL.tensor_sketch_hashes(0, 24, 0)


@pytest.mark.parametrize("kind", ["rm", "ts"])
def test_compact_kernel_approaches_full_bilinear_kernel(kind):
    """⟨φ(X), φ(Y)⟩ → Σ_{n,m} ⟨x_n, y_m⟩² as d grows (relative error over 12 seeds)."""
    x = _maps(5, b=2, n=6, c=32)
    xs = x.reshape(2, -1, 32)
    exact = _kernel(xs[0], xs[1])
    errs, means = [], []
    for d in (64, 256, 1024, 4096):
        vals = []
        for seed in range(12):
            if kind == "rm":
                phi = BL.random_maclaurin(x, *BL.random_maclaurin_weights(seed, 32, d))
            else:
                phi = BL.tensor_sketch(x, *BL.tensor_sketch_hashes(seed, 32, d), dim=d)
            phi = np.asarray(phi, np.float64)
            vals.append(phi[0] @ phi[1])
        vals = np.asarray(vals)
        errs.append(float(np.mean(np.abs(vals - exact))) / exact)
        means.append(float(np.mean(vals)) / exact)
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[0] / errs[-1] > 4.0, errs  # ~1/√d: 8x expected over 64x in d
    assert errs[-1] < 0.1, errs
    assert abs(means[-1] - 1.0) < 0.05, means  # unbiased


def test_signed_sqrt_values_and_finite_gradients():
    x = jnp.asarray([-4.0, -0.25, 0.0, 1e-8, 0.25, 9.0])
    for grad in BL.SQRT_GRADS:
        np.testing.assert_allclose(
            np.asarray(BL.signed_sqrt(x, grad)), np.sign(x) * np.sqrt(np.abs(x)), rtol=1e-6
        )
    g_exact = np.asarray(jax.vmap(jax.grad(lambda v: BL.signed_sqrt(v, "exact")))(x))
    g_rel = np.asarray(jax.vmap(jax.grad(lambda v: BL.signed_sqrt(v, "released")))(x))
    assert np.all(np.isfinite(g_exact)) and np.all(np.isfinite(g_rel))
    a = np.abs(np.asarray(x, np.float64))
    nz = a > 0
    np.testing.assert_allclose(g_exact[nz], 0.5 / np.sqrt(a[nz]), rtol=1e-5)
    assert g_exact[2] == pytest.approx(0.5 / np.sqrt(1e-12), rel=1e-5)  # the cap at 0
    np.testing.assert_allclose(g_rel, 0.5 / (np.sqrt(a) + 0.1), rtol=1e-5)
    assert g_rel[2] == pytest.approx(5.0)
    # plain autodiff of the same formula gives nan at 0: the point of the custom JVP
    plain = jax.grad(lambda v: jnp.sign(v) * jnp.sqrt(jnp.abs(v)))(0.0)
    assert not np.isfinite(float(plain))
    # forward-mode agrees with reverse-mode
    _, tan = jax.jvp(lambda v: BL.signed_sqrt(v, "exact"), (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(tan), g_exact, rtol=1e-6)
    with pytest.raises(ValueError, match="grad"):
        BL.signed_sqrt(x, "none")
    with pytest.raises(ValueError, match="eps"):
        BL.signed_sqrt(x, "exact", eps=0.0)


def test_l2_normalize():
    x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(BL.l2_normalize(x)), [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)
    g = jax.grad(lambda v: jnp.sum(BL.l2_normalize(v) * jnp.asarray([1.0, 2.0])))(jnp.zeros(2))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kind", BL.KINDS)
def test_module_pipeline_and_gradients(kind):
    x = jnp.asarray(_maps(7))
    mod = BL.CompactBilinear(kind=kind, dim=128, seed=3)
    variables = mod.init(jax.random.key(0), x)
    assert jax.tree_util.tree_leaves(variables) == []  # fixed sketch: no variables
    out = _apply(mod, variables, x)
    d = 24 * 24 if kind == "full" else 128
    assert out.shape == (2, d)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, rtol=1e-5)
    # the documented order: sketch -> sum pool -> signed sqrt -> L2
    if kind == "full":
        z = BL.full_bilinear(x)
    elif kind == "rm":
        z = BL.random_maclaurin(x, *BL.random_maclaurin_weights(3, 24, 128))
    else:
        z = BL.tensor_sketch(x, *BL.tensor_sketch_hashes(3, 24, 128), dim=128)
    ref = BL.l2_normalize(BL.signed_sqrt(z))
    # √ magnifies float32 round-off of entries near 0 (TS: FFT round-off ~1e-9 -> ~3e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-4)
    jitted = jax.jit(mod.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(out), rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda v: jnp.sum(_apply(mod, variables, v)[:, :5]))(x)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize("kind", ["rm", "ts"])
def test_learnable_sketch_parameters(kind):
    x = jnp.asarray(_maps(8))
    mod = BL.CompactBilinear(kind=kind, dim=64, seed=5, learnable=True)
    v1 = mod.init(jax.random.key(0), x)
    v2 = mod.init(jax.random.key(1), x)  # the seed, not the init rng, fixes the sketch
    names = ("w1", "w2") if kind == "rm" else ("s1", "s2")
    assert sorted(v1["params"]) == sorted(names)
    for n in names:
        np.testing.assert_array_equal(np.asarray(v1["params"][n]), np.asarray(v2["params"][n]))
    fixed = BL.CompactBilinear(kind=kind, dim=64, seed=5).apply({}, x)
    np.testing.assert_allclose(np.asarray(mod.apply(v1, x)), np.asarray(fixed), rtol=1e-6)
    g = jax.grad(lambda p: jnp.sum(_apply(mod, {"params": p}, x)[:, :3]))(v1["params"])
    assert all(float(jnp.abs(g[n]).sum()) > 0 for n in names)


def test_module_validation():
    with pytest.raises(ValueError, match="kind"):
        BL.CompactBilinear(kind="fisher").init(jax.random.key(0), jnp.ones((1, 2, 2, 3)))
