"""Tests for fgloc.localize.parts (Simon, Rodner & Denzler 2014 part discovery)."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgloc.data.pipeline import crop_resize
from fgloc.localize import parts as P


def _blobs(h: int, w: int, blobs: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Sum of isotropic Gaussians ``(amplitude, x, y, sigma)`` on pixel centres -> ``(h, w)``."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros((h, w), np.float64)
    for a, x, y, s in blobs:
        out += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    return out.astype(np.float32)


# ------------------------------------------------------------------------------ centre operators
def test_gmm_picks_the_heavier_of_two_blobs():
    # Heavier blob: amplitude 3, sigma 3 (mass 27·2π) vs amplitude 1, sigma 4 (mass 16·2π).
    m = _blobs(60, 60, [(3.0, 15.0, 20.0, 3.0), (1.0, 45.0, 40.0, 4.0)])
    np.testing.assert_allclose(np.asarray(P.gmm_centres(jnp.asarray(m))), [15.0, 20.0], atol=1e-2)
    # Swap the masses: the other blob wins.
    m2 = _blobs(60, 60, [(0.5, 15.0, 20.0, 3.0), (2.0, 45.0, 40.0, 4.0)])
    np.testing.assert_allclose(np.asarray(P.gmm_centres(jnp.asarray(m2))), [45.0, 40.0], atol=1e-2)
    # The centre of mass lies between them; the argmax is the peak pixel's centre.
    com = np.asarray(P.mass_centres(jnp.asarray(m)))
    want = (27 * np.array([15.0, 20.0]) + 16 * np.array([45.0, 40.0])) / 43
    np.testing.assert_allclose(com, want, atol=0.05)
    np.testing.assert_allclose(np.asarray(P.argmax_centres(jnp.asarray(m))), [14.5, 19.5])


def test_gmm_pooled_matches_full_resolution():
    m = _blobs(64, 64, [(3.0, 17.3, 22.1, 3.0), (1.0, 45.0, 40.0, 4.0)])
    full = np.asarray(P.gmm_centres(jnp.asarray(m)))
    pooled = np.asarray(P.gmm_centres(jnp.asarray(m), pool=4))
    np.testing.assert_allclose(pooled, full, atol=0.05)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_weighted_em_equals_sklearn_on_replicated_points():
    """Integer weights == EM on points repeated that many times (sklearn, same initialisation)."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(0)
    h, w, n_iter, reg = 12, 15, 7, 1.0
    m = rng.integers(0, 4, size=(h, w)).astype(np.float32)
    m[2:5, 2:6] += 6  # a dense corner so the two components separate
    ys, xs = np.nonzero(m)
    reps = m[ys, xs].astype(int)
    pts = np.repeat(np.stack([xs + 0.5, ys + 0.5], -1), reps, axis=0).astype(np.float64)
    # Our deterministic initialisation, recomputed here.
    mean = pts.mean(0)
    cov = np.cov(pts.T, bias=True) + reg * np.eye(2)
    evals, evecs = np.linalg.eigh(cov)
    off = np.sqrt(evals[-1] - reg) * evecs[:, -1]
    gm = GaussianMixture(
        2,
        covariance_type="full",
        reg_covar=reg,
        max_iter=n_iter,
        tol=0.0,
        weights_init=[0.5, 0.5],
        means_init=np.stack([mean + off, mean - off]),
        precisions_init=np.stack([np.linalg.inv(cov)] * 2),
    ).fit(pts)
    want = np.asarray(gm.means_)[np.argmax(np.asarray(gm.weights_))]
    got = np.asarray(P.gmm_centres(jnp.asarray(m), n_iter=n_iter, reg=reg))
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_all_zero_maps_and_shapes():
    z = jnp.zeros((2, 3, 10, 20))
    np.testing.assert_allclose(
        np.asarray(P.gmm_centres(z)), np.broadcast_to([10.0, 5.0], (2, 3, 2))
    )
    np.testing.assert_allclose(
        np.asarray(P.mass_centres(z)), np.broadcast_to([10.0, 5.0], (2, 3, 2))
    )
    np.testing.assert_allclose(
        np.asarray(P.argmax_centres(z)), np.broadcast_to([0.5, 0.5], (2, 3, 2))
    )
    with pytest.raises(ValueError, match="centre method"):
        P.map_centres(z, "mode")
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        P.gmm_centres(jnp.zeros(5))


def test_jit_equals_eager_and_vmap_equals_batched():
    rng = np.random.default_rng(1)
    maps = jnp.asarray(rng.random((3, 4, 16, 16)).astype(np.float32) ** 4)
    for method in P.CENTRES:
        eager = np.asarray(P.map_centres(maps, method))
        jitted = np.asarray(jax.jit(lambda m, method=method: P.map_centres(m, method))(maps))
        vm = np.asarray(jax.vmap(lambda m, method=method: P.map_centres(m, method))(maps))
        np.testing.assert_allclose(jitted, eager, atol=1e-4)
        np.testing.assert_allclose(vm, eager, atol=1e-4)


def test_activation_centres_follow_the_active_cell():
    # (1, 4, 4, 2) map; channel 0 fires only at cell (row 1, col 2), channel 1 at (2, 1).
    f = np.zeros((1, 4, 4, 2), np.float32)
    f[0, 1, 2, 0] = 5.0
    f[0, 2, 1, 1] = 2.0
    c = np.asarray(P.activation_centres(jnp.asarray(f), (32, 32), "argmax"))
    # Cell centre (j + 0.5) * 8 -> the nearest upsampled pixel centre, within half a pixel.
    np.testing.assert_allclose(c[0], [[20.0, 12.0], [12.0, 20.0]], atol=0.5)
    g = np.asarray(P.activation_centres(jnp.asarray(f), (32, 32), "gmm"))
    np.testing.assert_allclose(g[0, 0], [20.0, 12.0], atol=0.6)
    # Negative activations are ignored (rectified).
    f[0, 0, 0, 0] = -100.0
    c2 = np.asarray(P.activation_centres(jnp.asarray(f), (32, 32), "argmax"))
    np.testing.assert_allclose(c2, c)


# ------------------------------------------------------------------------ selection / predict
def _selection_fixture():
    # 3 images, 2 channels, 2 parts; boxes of diagonal 5 (3-4-5), 10 and 10.
    boxes = np.array([[0, 0, 3, 4], [0, 0, 6, 8], [10, 10, 16, 18]], np.float32)
    parts = np.array(
        [[[1, 1], [2, 2]], [[3, 3], [0, 0]], [[12, 12], [14, 15]]], np.float32
    )  # part 1 of image 1 invisible
    visible = np.array([[1, 1], [1, 0], [1, 1]], bool)
    centres = np.array(
        [[[1, 2], [2, 2]], [[3, 3], [9, 9]], [[12, 18], [14, 15]]], np.float32
    )  # (N, K, 2)
    return centres, parts, visible, boxes


def test_channel_costs_by_hand():
    centres, parts, visible, boxes = _selection_fixture()
    # Distances d[i, k, p] (pixels):
    #   part 0: k0: 1, 0, 6   k1: sqrt2, 6*sqrt2, sqrt(4+9)
    #   part 1 (images 0, 2): k0: 1, sqrt(4+9)   k1: 0, 0
    diag = np.array([5.0, 10.0, 10.0])
    d00 = np.array([1, 0, 6]) / diag
    d10 = np.array([np.sqrt(2), 6 * np.sqrt(2), np.sqrt(13)]) / diag
    d01 = np.array([1, np.sqrt(13)]) / diag[[0, 2]]
    got = np.asarray(P.channel_costs(centres, parts, visible, boxes, "mean", True, True))
    want = [[np.mean(d00**2), np.mean(d01**2)], [np.mean(d10**2), 0.0]]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got = np.asarray(P.channel_costs(centres, parts, visible, boxes, "median", False, True))
    want = [[np.median(d00), np.median(d01)], [np.median(d10), 0.0]]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got = np.asarray(P.channel_costs(centres, parts, visible, None, "mean", False, False))
    want = [[7 / 3, (1 + np.sqrt(13)) / 2], [(np.sqrt(2) * 7 + np.sqrt(13)) / 3, 0.0]]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(P.select_channels(got), [0, 1])
    with pytest.raises(ValueError, match="needs boxes"):
        P.channel_costs(centres, parts, visible, None, normalize=True)
    with pytest.raises(ValueError, match="visible"):
        P.channel_costs(centres, parts, visible[:, :1], boxes)


def test_never_visible_part_gets_no_channel_and_nan_prediction():
    centres, parts, visible, boxes = _selection_fixture()
    visible = visible.copy()
    visible[:, 1] = False
    costs = P.channel_costs(centres, parts, visible, boxes)
    assert np.all(np.isinf(np.asarray(costs)[:, 1]))
    ch = P.select_channels(costs)
    np.testing.assert_array_equal(ch, [0, -1])
    pred = P.predict_parts(centres, ch)
    np.testing.assert_allclose(pred[:, 0], centres[:, 0])
    assert np.all(np.isnan(pred[:, 1]))


def test_to_image_coords_and_crop_resize_roundtrip():
    img = np.zeros((50, 80, 3), np.uint8)
    img[30, 60] = 255  # a bright pixel, centre (60.5, 30.5)
    region = [40.2, 10.0, 79.6, 49.5]  # rounded outwards to [40, 10, 80, 50]
    px, used = crop_resize(img, region, 40)
    np.testing.assert_array_equal(used, [40, 10, 80, 50])
    assert px.shape == (40, 40, 3) and px.dtype == np.float32
    uv = np.asarray(P.argmax_centres(jnp.asarray(px[..., 0])))
    xy = P.to_image_coords(uv[None, None], used[None], 40)[0, 0]
    np.testing.assert_allclose(xy, [60.5, 30.5], atol=0.5)
    np.testing.assert_allclose(
        P.to_image_coords(np.array([[[10.0, 20.0]]]), np.array([[0, 0, 200, 100]]), 100)[0, 0],
        [20.0, 20.0],
    )
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        crop_resize(np.zeros((5, 5)), None, 4)


# ------------------------------------------------------------------------------ the detector
class _Tiny(nn.Module):
    """Conv-only 'network' whose layer ``"id"`` is the input itself (channel k = colour k).

    Follows the model contract: ``features(x, train, stop_at)`` stops after ``stop_at``.
    """

    @nn.compact
    def features(
        self, x: jax.Array, train: bool = False, stop_at: str | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del train
        inter = {"id": x}
        if stop_at == "id":
            return x, inter
        inter["sq"] = x * x
        if stop_at not in (None, "sq"):
            raise KeyError(f"_Tiny has no layer {stop_at!r}; its layers: ['id', 'sq']")
        y = nn.Dense(1, name="unused")(x)
        return y, inter

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[None, dict[str, jax.Array]]:
        return None, self.features(x, train)[1]


class _FakePretrained(NamedTuple):
    model: Any
    variables: Any
    preprocess: Any


def _fake_pretrained() -> _FakePretrained:
    model = _Tiny()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), method=model.features)
    return _FakePretrained(model, variables, lambda raw: jnp.asarray(raw, jnp.float32) / 255.0)


def _dot_images(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Images with a red dot (part 0) and a blue dot (part 1) at random places -> (imgs, xy)."""
    imgs, xy = [], []
    for _ in range(n):
        h, w = rng.integers(60, 90), rng.integers(60, 90)
        img = np.zeros((h, w, 3), np.uint8)
        pts = []
        for colour in (0, 2):
            x, y = rng.integers(10, w - 10), rng.integers(10, h - 10)
            img[y - 2 : y + 3, x - 2 : x + 3, colour] = 255
            pts.append((x + 0.5, y + 0.5))
        imgs.append(img)
        xy.append(pts)
    return imgs, np.asarray(xy, np.float32)


@pytest.mark.parametrize("centre", ["gmm", "argmax"])
def test_part_detector_fit_save_load_predict(tmp_path, centre):
    rng = np.random.default_rng(0)
    pre = _fake_pretrained()
    imgs, xy = _dot_images(6, rng)
    boxes = np.array([[0, 0, im.shape[1], im.shape[0]] for im in imgs], np.float32)
    extractor = P.CentreExtractor(pre, "id", map_type="activation", centre=centre, input_size=32)
    centres = P.compute_centres(extractor, imgs[:4], None, batch_size=3)  # (4, 3, 2)
    assert centres.shape == (4, 3, 2)
    visible = np.ones((4, 2), bool)
    det = P.PartDetector.fit(
        centres, xy[:4], visible, boxes[:4], ["red", "blue"],
        backbone="fake", layer="id", map_type="activation", centre=centre, input_size=32,
        gmm_pool=1,
    )  # fmt: skip
    np.testing.assert_array_equal(det.box.channels, [[0], [2]])  # red -> R, blue -> B channel
    det.save(tmp_path)
    det2 = P.PartDetector.load(tmp_path)
    np.testing.assert_array_equal(det2.box.channels, det.box.channels)
    np.testing.assert_allclose(det2.box.costs, det.box.costs)
    assert det2.part_names == ("red", "blue") and det2.centre == centre
    assert (det2.backbone, det2.layer, det2.input_size, det2.map_type) == (
        "fake", "id", 32, "activation",
    )  # fmt: skip
    np.testing.assert_array_equal(det2.used_channels("box"), [0, 2])
    assert det2.full is None  # full images use the box read-out
    # Test images: full image and box-restricted; the box around both dots.
    pred_full = det2.predict_images(pre, imgs[4:], batch_size=2)
    # A 5-pixel dot in a 60-90 px image resized to 32 px (one input pixel ≈ 2.5 image pixels).
    np.testing.assert_allclose(pred_full, xy[4:], atol=2.5)
    tb = np.concatenate([xy[4:].min(1) - 6, xy[4:].max(1) + 6], axis=1)
    pred_box = det2.predict_images(pre, imgs[4:], boxes=tb, batch_size=2)
    np.testing.assert_allclose(pred_box, xy[4:], atol=2.0)


def test_top_m_readout_averages_the_m_best_channels():
    # 3 channels; part 0 sits at the midpoint of channels 0 and 2, part 1 on channel 1.
    rng = np.random.default_rng(0)
    n = 12
    centres = rng.uniform(0, 100, (n, 3, 2)).astype(np.float32)
    parts = np.stack([(centres[:, 0] + centres[:, 2]) / 2, centres[:, 1]], 1)
    visible = np.ones((n, 2), bool)
    boxes = np.tile(np.array([0, 0, 100, 100], np.float32), (n, 1))
    costs = np.asarray(P.channel_costs(centres, parts, visible, boxes))
    ch = P.best_channels(costs, 2)
    np.testing.assert_array_equal(ch[:, 0], P.select_channels(costs))
    np.testing.assert_array_equal(ch[1, 0], 1)
    assert set(ch[0].tolist()) == {0, 2}  # the two channels that bracket part 0
    r = P.PartReadout.fit(centres, parts, visible, boxes, top_m=2)
    np.testing.assert_array_equal(r.channels, ch)
    pred = r.predict(centres)
    np.testing.assert_allclose(pred[:, 0], parts[:, 0], rtol=1e-6)
    np.testing.assert_allclose(pred[:, 1], (centres[:, 1] + centres[:, ch[1, 1]]) / 2, rtol=1e-6)
    # m = 1 is the paper's detector: each part at its single best channel.
    np.testing.assert_allclose(P.PartReadout.fit(centres, parts, visible, boxes).predict(centres),
                               P.predict_parts(centres, P.select_channels(costs)))  # fmt: skip
    # NaN centres and -1 entries are left out of the mean; nothing left -> NaN.
    c2 = centres.copy()
    c2[0, 2] = np.nan
    out = P.predict_parts(c2, np.array([[0, 2], [1, -1], [-1, -1]]))
    np.testing.assert_allclose(out[0, 0], centres[0, 0])
    np.testing.assert_allclose(out[:, 1], centres[:, 1])
    assert np.all(np.isnan(out[:, 2]))
    inf = np.array([[1.0, np.inf], [0.5, np.inf], [2.0, np.inf]])
    np.testing.assert_array_equal(P.best_channels(inf, 2), [[1, 0], [-1, -1]])
    with pytest.raises(ValueError, match="m must be in"):
        P.best_channels(inf, 4)


def test_ridge_readout_and_cross_validation_by_hand():
    """The ridge read-out recovers parts that are linear in the frame-relative centres; its
    2-fold CV error equals fitting each half and scoring the other by hand."""
    from fgloc.metrics import normalized_part_error

    rng = np.random.default_rng(1)
    n, k = 40, 4
    boxes = np.concatenate([rng.uniform(0, 50, (n, 2)), rng.uniform(60, 200, (n, 2))], 1)
    boxes[:, 2:] += boxes[:, :2]
    wh = boxes[:, 2:] - boxes[:, :2]
    rel = rng.uniform(0, 1, (n, k, 2))
    centres = boxes[:, None, :2] + rel * wh[:, None]
    part_rel = np.stack([0.3 + 0.4 * rel[:, 1], 0.5 * (rel[:, 0] + rel[:, 2])], 1)
    parts = boxes[:, None, :2] + part_rel * wh[:, None]
    visible = np.ones((n, 2), bool)
    r = P.PartReadout.fit(centres, parts, visible, boxes, kind="ridge", alphas=(1e-6, 1.0))
    np.testing.assert_array_equal(r.used_channels(), np.arange(k))
    np.testing.assert_allclose(r.predict(centres, boxes), parts, atol=1e-3)
    np.testing.assert_allclose(r.regression.alpha, [1e-6, 1e-6])  # pyright: ignore[reportOptionalMemberAccess]
    with pytest.raises(ValueError, match="needs the frames"):
        r.predict(centres)
    # Cross-validation: perm of default_rng(seed), folds perm[:n//2] and perm[n//2:].
    perm = np.random.default_rng(5).permutation(n)
    folds = [perm[: n // 2], perm[n // 2 :]]
    preds = np.zeros_like(parts)
    for a, b in ((0, 1), (1, 0)):
        fa, fb = folds[a], folds[b]
        m = P.fit_part_regression(centres[fa], parts[fa], visible[fa], boxes[fa], (0.1, 10.0))
        preds[fb] = P.predict_part_regression(m, centres[fb], boxes[fb])
    want = normalized_part_error(preds, parts, visible, boxes)[1]
    got = P.cross_validate_readout(centres, parts, visible, boxes, seed=5, kind="ridge",
                                   alphas=(0.1, 10.0))  # fmt: skip
    assert got == pytest.approx(want, rel=1e-6)
    assert got < 0.05  # the relation is linear: little error held out
    with pytest.raises(ValueError, match="n_folds"):
        P.cross_validate_readout(centres, parts, visible, boxes, n_folds=1)


def test_detector_with_full_image_readouts_roundtrips_and_predicts(tmp_path):
    """A ridge detector with its own full-image read-out (fitted on whole-image centres) and a
    top-2 channel detector save, load and predict on photos as fitted."""
    rng = np.random.default_rng(2)
    pre = _fake_pretrained()
    imgs, xy = _dot_images(10, rng)
    hw = np.array([im.shape[:2] for im in imgs], np.float32)
    boxes = np.concatenate([xy.min(1) - 8, xy.max(1) + 8], axis=1)
    boxes = np.clip(boxes, 0, np.concatenate([hw[:, ::-1], hw[:, ::-1]], 1))
    visible = np.ones((10, 2), bool)
    settings = {"map_type": "activation", "centre": "mass", "input_size": 32}
    ex = P.CentreExtractor(pre, "id", **settings)
    c_box = P.compute_centres(ex, imgs[:8], boxes[:8])
    c_full = P.compute_centres(ex, imgs[:8], None)
    for readout, top_m in (("ridge", 1), ("channels", 2)):
        det = P.PartDetector.fit(
            c_box, xy[:8], visible[:8], boxes[:8], ["red", "blue"], backbone="fake", layer="id",
            readout=readout, top_m=top_m, full_centres=c_full, image_sizes=hw[:8],
            alphas=(1e-3, 1.0), **settings,
        )  # fmt: skip
        assert det.full is not None and det.full.kind == readout
        d = det.save(tmp_path / readout)
        back = P.PartDetector.load(d)
        assert back.act_grid is None and back.weights is None and back.box.top_m == top_m
        for frame, bx in (("box", boxes[8:]), ("full", None)):
            got = back.predict_images(pre, imgs[8:], boxes=bx, batch_size=3)
            cent = P.compute_centres(ex, imgs[8:], bx)
            frames = bx if bx is not None else np.array([[0, 0, w, h] for h, w in hw[8:]])
            want = det.predict_from_centres(cent, frames, frame)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
            assert got.shape == (2, 2, 2) and np.all(np.isfinite(got))
    with pytest.raises(ValueError, match="needs image_sizes"):
        P.PartDetector.fit(c_box, xy[:8], visible[:8], boxes[:8], ["r", "b"], backbone="f",
                           layer="id", readout="ridge", full_centres=c_full)  # fmt: skip
    with pytest.raises(ValueError, match="boxes must be"):
        det.predict_images(pre, imgs[8:], boxes=boxes[:1])
    (tmp_path / "ridge" / "part_detector.json").write_text('{"backbone": "x"}')
    with pytest.raises(ValueError, match="format-2"):
        P.PartDetector.load(tmp_path / "ridge")


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"part_detector\.json"):
        P.PartDetector.load(tmp_path)


def test_gradient_extractor_on_an_analytic_network():
    """``f = x²`` elementwise: channel k's gradient map is ``2 x_k``, so centres follow colour k."""
    pre = _fake_pretrained()
    rng = np.random.default_rng(3)
    imgs, xy = _dot_images(2, rng)
    ex = P.CentreExtractor(
        pre, "sq", channels=np.array([0, 2]), map_type="gradient", centre="gmm", input_size=32,
        gmm_pool=1,
    )  # fmt: skip
    c = P.compute_centres(ex, imgs, None, batch_size=2)
    np.testing.assert_allclose(c, xy, atol=2.0)
    ex_act = P.CentreExtractor(
        pre, "sq", channels=np.array([0, 2]), map_type="activation", centre="gmm", input_size=32,
        gmm_pool=1,
    )  # fmt: skip
    np.testing.assert_allclose(P.compute_centres(ex_act, imgs, None, batch_size=2), c, atol=0.5)


def test_part_regression_recovers_linear_relation_in_frame_coordinates():
    """Parts that are a fixed linear function of two channels' frame-relative centres are
    recovered (to the ridge shrinkage) on new images of other sizes; NaN centres are tolerated."""
    from fgloc.localize.parts import fit_part_regression, predict_part_regression

    rng = np.random.default_rng(0)
    n, k = 200, 6
    frames = np.concatenate([rng.uniform(0, 50, (n, 2)), rng.uniform(100, 300, (n, 2))], 1)
    frames[:, 2:] += frames[:, :2]
    rel = rng.uniform(0, 1, (n, k, 2))
    wh = frames[:, 2:] - frames[:, :2]
    centres = frames[:, None, :2] + rel * wh[:, None]
    part_rel = np.stack([0.5 * rel[:, 0] + 0.5 * rel[:, 3], 0.2 + 0.6 * rel[:, 1]], 1)
    parts = frames[:, None, :2] + part_rel * wh[:, None]
    visible = np.ones((n, 2), bool)
    visible[::7, 1] = False
    train, test = slice(0, 150), slice(150, None)
    model = fit_part_regression(centres[train], parts[train], visible[train], frames[train],
                                alphas=(1e-6,))  # fmt: skip
    pred = predict_part_regression(model, centres[test], frames[test])
    np.testing.assert_allclose(pred, parts[test], atol=1e-3)
    centres[150, 2] = np.nan  # an unused channel without a centre changes nothing
    pred2 = predict_part_regression(model, centres[test], frames[test])
    np.testing.assert_allclose(pred2, parts[test], atol=1e-3)
