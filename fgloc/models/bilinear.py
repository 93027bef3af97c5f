"""Bilinear and compact bilinear pooling (Lin et al. 2015; Gao, Beijbom, Zhang & Darrell 2016).

Paper 2 (Zhang et al. 2016, §3.3, §3.5) optionally replaces its holistic feature by the compact
bilinear feature of Gao et al., "Compact Bilinear Pooling" (CVPR 2016). For a feature map with
local descriptors ``x_n ∈ R^C`` (n over the ``h·w`` positions):

* **full bilinear** (the exact reference): ``B(X) = Σ_n x_n x_nᵀ``, flattened to ``C²``; its
  kernel is ``⟨B(X), B(Y)⟩ = Σ_{n,m} ⟨x_n, y_m⟩²`` (:func:`full_bilinear`);
* **Random Maclaurin** (RM): ``φ(x) = (x W₁) ⊙ (x W₂)`` with ``W₁, W₂ ∈ R^{C×d}`` of random
  ±1 entries times a scale, *summed* over positions (:func:`random_maclaurin`). With each matrix
  scaled by ``d^{-1/4}`` (``scale="unbiased"``, ``φ = d^{-1/2} (R₁ᵀx) ⊙ (R₂ᵀx)``, Gao et al.'s
  Alg. 1) ``E⟨φ(x), φ(y)⟩ = ⟨x, y⟩²``; the released MatConvNet code scales each by ``1/√d``
  (``scale="released"``), i.e. ``⟨x, y⟩² / d`` — the same feature after L2 normalisation;
  paper 2 uses RM with d = 5000;
* **Tensor Sketch** (TS): count sketches ``Ψᵢ(x)[k] = Σ_{c: hᵢ(c)=k} sᵢ(c) x_c`` with fixed
  random hashes ``hᵢ ∈ [0, d)`` and signs ``sᵢ ∈ {±1}``, and
  ``φ(x) = IFFT(FFT(Ψ₁(x)) ⊙ FFT(Ψ₂(x)))`` (their circular convolution), summed over positions
  (:func:`tensor_sketch`): ``E⟨φ(x), φ(y)⟩ = ⟨x, y⟩²`` with the normalised inverse FFT
  (``scale="unbiased"``); the released Caffe layer's inverse FFT is unnormalised, ``d ×`` that
  (``scale="released"``). Since FFT is linear the sum over positions is taken in the frequency
  domain, so only one inverse FFT per image is computed.

Then the signed square root ``sign(z)√|z|`` (:func:`signed_sqrt`, a ``jax.custom_jvp`` whose
derivative stays finite at 0; the released backward ``0.5 / (√|z| + 0.1)`` is the default) and L2
normalisation (:func:`l2_normalize`). The order is the released one: (ReLU of the input, the
caller's) → sketch → sum pooling → signed sqrt → L2. FACTS.md: users of those repos report
gradient explosions near 0 without the damped backward and non-converging training without the
normalisation.

Inputs are ``(B, ..., C)`` (e.g. ``(B, h, w, C)``); every axis between the first and the last is
a position. Outputs are ``(B, D)``, ``D = C²`` or ``d``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "KINDS",
    "SCALES",
    "SQRT_GRADS",
    "CompactBilinear",
    "count_sketch",
    "full_bilinear",
    "l2_normalize",
    "random_maclaurin",
    "random_maclaurin_weights",
    "signed_sqrt",
    "tensor_sketch",
    "tensor_sketch_hashes",
]

Array = jax.Array

#: ``kind`` of :class:`CompactBilinear`.
KINDS = ("full", "rm", "ts")
#: ``scale`` of the sketches: kernel ``⟨x, y⟩²`` in expectation, or the released code's scale.
SCALES = ("unbiased", "released")
#: ``grad`` of :func:`signed_sqrt`.
SQRT_GRADS = ("released", "exact")


def _positions(x: Any, name: str = "x") -> Array:
    """``(B, ..., C) -> (B, N, C)``; ValueError for fewer than 2 axes."""
    a = jnp.asarray(x)
    if a.ndim < 2:
        raise ValueError(f"{name} must be (B, ..., C) with at least 2 axes, got shape {a.shape}")
    if a.ndim == 2:
        return a[:, None, :]
    return a.reshape(a.shape[0], -1, a.shape[-1])


def _check_dim(dim: int) -> int:
    d = int(dim)
    if d < 1:
        raise ValueError(f"dim must be a positive sketch dimension, got {dim}")
    return d


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


# ------------------------------------------------------------------------------- full bilinear
def full_bilinear(x: Any) -> Array:
    """``B(X) = Σ_n x_n x_nᵀ`` over all positions, flattened row-major: ``(B, ..., C) -> (B, C²)``
    (entry ``c·C + c'`` is ``Σ_n x_nc x_nc'``)."""
    xs = _positions(x)
    b, _, c = xs.shape
    return jnp.einsum("bnc,bnd->bcd", xs, xs).reshape(b, c * c)


# ----------------------------------------------------------------------------- Random Maclaurin
def random_maclaurin_weights(
    seed: int, in_dim: int, dim: int, scale: str = "unbiased", dtype: Any = jnp.float32
) -> tuple[Array, Array]:
    """The two fixed ``(in_dim, dim)`` RM matrices of random ±1 entries drawn from ``seed``
    (``jax.random``, the same on every backend), each times ``d^{-1/4}`` (``"unbiased"``) or
    ``d^{-1/2}`` (``"released"``, MatConvNet ``addCompactRM``)."""
    _check_scale(scale)
    d = _check_dim(dim)
    k1, k2 = jax.random.split(jax.random.key(seed))
    factor = d**-0.25 if scale == "unbiased" else d**-0.5
    w1 = jax.random.rademacher(k1, (in_dim, d), dtype) * factor
    w2 = jax.random.rademacher(k2, (in_dim, d), dtype) * factor
    return w1, w2


def random_maclaurin(x: Any, w1: Any, w2: Any, sum_pool: bool = True) -> Array:
    """Random Maclaurin projection ``(x W₁) ⊙ (x W₂)`` per position, summed over positions:
    ``(B, ..., C) -> (B, d)`` (``sum_pool=False``: ``(B, ..., d)``, no pooling)."""
    a = jnp.asarray(x)
    w1, w2 = jnp.asarray(w1), jnp.asarray(w2)
    if w1.ndim != 2 or w1.shape != w2.shape or w1.shape[0] != a.shape[-1]:
        raise ValueError(
            f"w1, w2 must both be (C, d) with C = {a.shape[-1]}, got {w1.shape} and {w2.shape}"
        )
    if not sum_pool:
        return (a @ w1) * (a @ w2)
    xs = _positions(a)
    return jnp.sum((xs @ w1) * (xs @ w2), axis=1)


# -------------------------------------------------------------------------------- Tensor Sketch
def tensor_sketch_hashes(seed: int, in_dim: int, dim: int) -> tuple[Array, Array, Array, Array]:
    """Fixed TS hashes and signs from ``seed``: ``(h1, s1, h2, s2)``, ``hᵢ`` int32 ``(in_dim,)``
    uniform in ``[0, dim)``, ``sᵢ`` float32 ``(in_dim,)`` in ``{−1, +1}``."""
    d = _check_dim(dim)
    k = jax.random.split(jax.random.key(seed), 4)
    h1 = jax.random.randint(k[0], (in_dim,), 0, d, jnp.int32)
    h2 = jax.random.randint(k[2], (in_dim,), 0, d, jnp.int32)
    s1 = jax.random.rademacher(k[1], (in_dim,), jnp.float32)
    s2 = jax.random.rademacher(k[3], (in_dim,), jnp.float32)
    return h1, s1, h2, s2


def count_sketch(x: Any, h: Any, s: Any, dim: int, impl: str = "segment") -> Array:
    """Count sketch ``Ψ(x)[k] = Σ_{c: h(c)=k} s(c) x_c`` of the last axis: ``(..., C) ->
    (..., d)``. ``impl``: ``"segment"`` (a scatter-add, ``jax.ops.segment_sum``, O(C) per
    vector) or ``"dense"`` (``x @ M`` with the ``(C, d)`` matrix ``M[c, h(c)] = s(c)``)."""
    a = jnp.asarray(x)
    d = _check_dim(dim)
    h = jnp.asarray(h, jnp.int32)
    s = jnp.asarray(s, a.dtype)
    if h.shape != (a.shape[-1],) or s.shape != h.shape:
        raise ValueError(f"h, s must be ({a.shape[-1]},), got {h.shape} and {s.shape}")
    if impl == "dense":
        m = jax.nn.one_hot(h, d, dtype=a.dtype) * s[:, None]
        return a @ m
    if impl != "segment":
        raise ValueError(f"impl must be 'segment' or 'dense', got {impl!r}")
    flat = a.reshape(-1, a.shape[-1]) * s[None, :]
    out = jax.ops.segment_sum(flat.T, h, num_segments=d)  # (d, M)
    return out.T.reshape(*a.shape[:-1], d)


def tensor_sketch(
    x: Any,
    h1: Any,
    s1: Any,
    h2: Any,
    s2: Any,
    dim: int,
    scale: str = "unbiased",
    impl: str = "segment",
) -> Array:
    """Tensor Sketch of ``x x_nᵀ`` summed over positions: ``(B, ..., C) -> (B, d)``,
    ``irfft(Σ_n rfft(Ψ₁(x_n)) ⊙ rfft(Ψ₂(x_n)))`` (× d for ``scale="released"``)."""
    _check_scale(scale)
    d = _check_dim(dim)
    xs = _positions(x)
    f1 = jnp.fft.rfft(count_sketch(xs, h1, s1, d, impl), axis=-1)
    f2 = jnp.fft.rfft(count_sketch(xs, h2, s2, d, impl), axis=-1)
    out = jnp.fft.irfft(jnp.sum(f1 * f2, axis=1), n=d, axis=-1).astype(xs.dtype)
    return out * d if scale == "released" else out


# ------------------------------------------------------------------- signed sqrt and L2 norm
@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _signed_sqrt(x: Array, grad: str, eps: float) -> Array:
    return jnp.sign(x) * jnp.sqrt(jnp.abs(x))


@_signed_sqrt.defjvp
def _signed_sqrt_jvp(grad: str, eps: float, primals: tuple, tangents: tuple) -> tuple:
    (x,), (t,) = primals, tangents
    a = jnp.abs(x)
    if grad == "released":
        slope = 0.5 / (jnp.sqrt(a) + eps)
    else:
        slope = 0.5 * jax.lax.rsqrt(jnp.maximum(a, eps))
    return _signed_sqrt(x, grad, eps), slope * t


def signed_sqrt(x: Any, grad: str = "released", eps: float | None = None) -> Array:
    """``sign(z)·√|z|`` elementwise, with a derivative that is finite at 0 (plain autodiff gives
    ``0 · ∞ = nan`` there).

    ``grad="released"``: ``0.5 / (√|z| + eps)``, eps = 0.1 by default (Gao et al.'s MatConvNet
    ``yang_sqrt_backward``, "to avoid gradient explosion"; the forward is exact, the backward
    damped everywhere). ``grad="exact"``: ``0.5 / √max(|z|, eps)``, eps = 1e-12 by default: the
    analytic derivative wherever ``|z| ≥ eps``, capped at ``0.5/√eps`` below.
    """
    if grad not in SQRT_GRADS:
        raise ValueError(f"grad must be one of {SQRT_GRADS}, got {grad!r}")
    e = (0.1 if grad == "released" else 1e-12) if eps is None else float(eps)
    if not e > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return _signed_sqrt(jnp.asarray(x), grad, e)


def l2_normalize(x: Any, axis: int = -1, eps: float = 1e-12) -> Array:
    """``x / √(Σ x² + eps)`` along ``axis`` (finite value and gradient at ``x = 0``)."""
    a = jnp.asarray(x)
    return a * jax.lax.rsqrt(jnp.sum(jnp.square(a), axis=axis, keepdims=True) + eps)


# ---------------------------------------------------------------------------------- the module
class CompactBilinear(nn.Module):
    """Bilinear pooling layer: sketch → sum over positions → signed sqrt → L2 normalisation.

    Attributes:
      kind: ``"full"`` (``C²``), ``"rm"`` (Random Maclaurin) or ``"ts"`` (Tensor Sketch).
      dim: sketch dimension d (ignored for ``"full"``); Gao et al.: 8192 (TS on CUB), paper 2:
        5000 (RM).
      seed: seed of the random matrices / hashes, independent of Flax's init rng, so every init
        (and every process) builds the same sketch.
      learnable: RM: ``W₁, W₂`` are parameters ``"w1"``, ``"w2"`` initialised from the seed (the
        released default, ``learnW=true``); TS: the signs ``s₁, s₂`` are parameters (the released
        Caffe layer's learnable weights), the hashes stay fixed. Otherwise the sketch is
        recomputed from the seed at every call (a constant under ``jit``), and the module has no
        variables.
      scale: ``"unbiased"`` or ``"released"`` (see the module docstring).
      use_signed_sqrt, sqrt_grad: apply :func:`signed_sqrt` with that backward.
      normalize: apply :func:`l2_normalize`.
      ts_impl: count-sketch implementation for TS (:func:`count_sketch`).

    ``__call__(x)``: ``(B, ..., C)`` (post-ReLU features) -> ``(B, D)``.
    """

    kind: str = "ts"
    dim: int = 8192
    seed: int = 0
    learnable: bool = False
    scale: str = "unbiased"
    use_signed_sqrt: bool = True
    sqrt_grad: str = "released"
    normalize: bool = True
    ts_impl: str = "segment"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        c = int(jnp.shape(x)[-1])
        if self.kind == "full":
            z = full_bilinear(x)
        elif self.kind == "rm":
            make = functools.partial(random_maclaurin_weights, self.seed, c, self.dim, self.scale)
            if self.learnable:
                w1 = self.param("w1", lambda _rng: make()[0])
                w2 = self.param("w2", lambda _rng: make()[1])
            else:
                w1, w2 = make()
            z = random_maclaurin(x, w1, w2)
        else:
            h1, s1, h2, s2 = tensor_sketch_hashes(self.seed, c, self.dim)
            if self.learnable:
                init1, init2 = s1, s2
                s1 = self.param("s1", lambda _rng: init1)
                s2 = self.param("s2", lambda _rng: init2)
            z = tensor_sketch(x, h1, s1, h2, s2, self.dim, self.scale, self.ts_impl)
        if self.use_signed_sqrt:
            z = signed_sqrt(z, self.sqrt_grad)
        if self.normalize:
            z = l2_normalize(z)
        return z
