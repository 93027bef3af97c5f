"""KeypointPredictor: save / load round trip, predictions in each photo's own pixels (checked
against the model's heatmaps by hand), flip test, clear errors for bad folders and inputs, and
the keypoint overlay picture."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fgloc.app.overlays import save_keypoint_overlay
from fgloc.data.pipeline import resize_image
from fgloc.localize import keypoints as kpt
from fgloc.localize.keypoint_predictor import KeypointPredictor, PredictorError
from fgloc.metrics import CUB_PART_NAMES
from fgloc.models.efficientnet_lite import EfficientNetLite, preprocess
from fgloc.models.keypoint_fcn import KeypointFCN

S = 64


@pytest.fixture(scope="module")
def predictor():
    model = KeypointFCN(
        backbone=EfficientNetLite("lite0"), layers=("stage5", "stage7"), head=((4, 1),)
    )
    x = jnp.zeros((1, S, S, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
    return KeypointPredictor(
        model=model,
        variables=variables,
        backbone="efficientnet_lite0",
        input_size=S,
        stride=16.0,
        decoder="soft_argmax",
        decoder_kwargs={"window": 3},
        activation="softmax",
        flip_test=True,
        batch_size=2,
    )


def _photos():
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, size=s, dtype=np.uint8)
        for s in ((50, 70, 3), (90, 40, 3), (64, 64, 3))
    ]


def test_round_trip_and_predictions_in_photo_pixels(predictor, tmp_path):
    d = predictor.save(tmp_path / "pred")
    cfg = json.loads((d / "predictor.json").read_text())
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["layers"] == ["stage5", "stage7"]
    assert cfg["input_size"] == S and cfg["decoder"] == "soft_argmax" and cfg["flip_test"]
    loaded = KeypointPredictor.load(d, batch_size=2)
    photos = _photos()
    xy, conf = loaded.predict_keypoints(photos)
    assert xy.shape == (3, 15, 2) and conf.shape == (3, 15)
    assert np.all((conf >= 0) & (conf <= 1))
    xy0, conf0 = predictor.predict_keypoints(photos)
    np.testing.assert_allclose(xy, xy0, atol=1e-4)
    np.testing.assert_allclose(conf, conf0, atol=1e-6)
    # by hand for the first photo: resize, heatmaps, flip average, decode, back to its pixels
    im = photos[0]
    x = preprocess(resize_image(im, (S, S)))[None]
    fwd = jax.jit(lambda v, x: predictor.model.apply(v, x)[0])
    z, zf = fwd(predictor.variables, x), fwd(predictor.variables, x[:, :, ::-1])
    z = kpt.flip_test_average(z, zf, kpt.flip_permutation(CUB_PART_NAMES))
    dec = kpt.decode_soft_argmax(z, 16.0, 3, activation="softmax")
    h, w = im.shape[:2]
    want = (np.asarray(dec.keypoints[0]) * [w / S, h / S]) - 0.5
    want = np.stack([np.clip(want[:, 0], 0, w - 1), np.clip(want[:, 1], 0, h - 1)], -1)
    np.testing.assert_allclose(xy[0], want, atol=1e-3)
    np.testing.assert_allclose(conf[0], np.asarray(dec.confidence[0]), atol=1e-5)


def test_multiscale_test_averages_each_size_on_the_input_grid(predictor, tmp_path):
    import dataclasses

    photos = _photos()
    # the input size alone is the single-scale predictor
    same = dataclasses.replace(predictor, test_sizes=(S,))
    np.testing.assert_allclose(same.photo_heatmaps(photos), predictor.photo_heatmaps(photos))
    multi = dataclasses.replace(predictor, test_sizes=(S, 2 * S))
    # by hand: each size's flip-tested heatmaps, the larger one resized to the S grid, averaged
    z1 = predictor.heatmaps(np.stack([resize_image(im, (S, S)) for im in photos]))
    z2 = predictor.heatmaps(np.stack([resize_image(im, (2 * S, 2 * S)) for im in photos]))
    g = S // 16
    z2 = np.asarray(jax.image.resize(jnp.asarray(z2), (3, g, g, 15), "bilinear"))
    np.testing.assert_allclose(multi.photo_heatmaps(photos), (z1 + z2) / 2, atol=1e-5)
    xy, conf = multi.predict_keypoints(photos)
    dec = kpt.decode_soft_argmax(jnp.asarray((z1 + z2) / 2), 16.0, 3, activation="softmax")
    h, w = photos[1].shape[:2]
    want = np.asarray(dec.keypoints[1]) * [w / S, h / S] - 0.5
    want = np.stack([np.clip(want[:, 0], 0, w - 1), np.clip(want[:, 1], 0, h - 1)], -1)
    np.testing.assert_allclose(xy[1], want, atol=1e-3)
    np.testing.assert_allclose(conf[1], np.asarray(dec.confidence[1]), atol=1e-5)
    # saved and loaded with its sizes
    loaded = KeypointPredictor.load(multi.save(tmp_path / "ms"), batch_size=2)
    assert loaded.test_sizes == (S, 2 * S)
    np.testing.assert_allclose(loaded.predict_keypoints(photos)[0], xy, atol=1e-4)
    with pytest.raises(PredictorError, match=r"test_sizes: 72 is not a positive multiple"):
        dataclasses.replace(predictor, test_sizes=(S, 72))


def test_points_are_clipped_into_tiny_photos_and_empty_input(predictor):
    xy, _ = predictor.predict_keypoints([np.zeros((3, 2, 3), np.uint8)])
    assert np.all((xy[..., 0] >= 0) & (xy[..., 0] <= 1) & (xy[..., 1] >= 0) & (xy[..., 1] <= 2))
    xy, conf = predictor.predict_keypoints([])
    assert xy.shape == (0, 15, 2) and conf.shape == (0, 15)


def test_bad_images_name_the_photo(predictor):
    with pytest.raises(ValueError, match=r"images\[1\] must be uint8 \(H, W, 3\)"):
        predictor.predict_keypoints([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match=r"images\[0\].*float32"):
        predictor.predict_keypoints([np.zeros((8, 8, 3), np.float32)])


def test_load_errors_name_what_is_wrong(predictor, tmp_path):
    with pytest.raises(PredictorError, match="not a directory"):
        KeypointPredictor.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictorError, match="predictor.json missing"):
        KeypointPredictor.load(tmp_path / "empty")
    d = predictor.save(tmp_path / "p")
    cfg = json.loads((d / "predictor.json").read_text())
    (d / "predictor.json").write_text("{not json")
    with pytest.raises(PredictorError, match="not JSON"):
        KeypointPredictor.load(d)
    (d / "predictor.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(PredictorError, match="not a keypoint predictor"):
        KeypointPredictor.load(d)
    (d / "predictor.json").write_text(json.dumps({**cfg, "backbone": "resnet9000"}))
    with pytest.raises(PredictorError, match="unknown backbone 'resnet9000'"):
        KeypointPredictor.load(d)
    (d / "predictor.json").write_text(json.dumps({**cfg, "head": [[8, 1]]}))
    with pytest.raises(PredictorError, match="(?s)do not fit.*head_convs_0"):
        KeypointPredictor.load(d)
    (d / "predictor.json").write_text(json.dumps({**cfg, "layers": ["stage9"]}))
    with pytest.raises(PredictorError, match="stage9"):
        KeypointPredictor.load(d)
    with pytest.raises(PredictorError, match="decoder must be one of"):
        KeypointPredictor(
            model=predictor.model,
            variables=predictor.variables,
            backbone="efficientnet_lite0",
            input_size=S,
            stride=16.0,
            decoder="mean",
        )


def test_keypoint_overlay_is_bounded(tmp_path):
    photo = np.zeros((40, 3000, 3), np.uint8)
    xy = np.stack([np.linspace(0, 2999, 15), np.full(15, 20.0)], -1)
    conf = np.linspace(0, 1, 15)
    out = tmp_path / "kp.png"
    save_keypoint_overlay(photo, xy, conf, out, min_confidence=0.1)
    w, h = Image.open(out).size
    assert max(w, h) <= 800
    with pytest.raises(ValueError, match="xy must be"):
        save_keypoint_overlay(photo, xy[:, :1], conf, out)


def test_cli_draws_keypoints_with_a_saved_predictor(predictor, tmp_path):
    """``fgloc localize PHOTO --method keypoints --weights DIR`` as a user runs it (subprocess):
    one overlay and one results line with the 15 named parts in the photo's pixels."""
    import subprocess
    import sys

    d = predictor.save(tmp_path / "pred")
    photo = tmp_path / "bird.png"
    Image.fromarray(_photos()[0]).save(photo)
    fgloc_script = pathlib.Path(sys.executable).with_name("fgloc")
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(fgloc_script), "localize", str(photo), "--method", "keypoints", "--weights", str(d),
         "--out", str(out)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [p["name"] for p in row["parts"]] == list(CUB_PART_NAMES)
    xy, _ = predictor.predict_keypoints([_photos()[0]])
    np.testing.assert_allclose([[p["x"], p["y"]] for p in row["parts"]], xy[0], atol=0.06)
    assert (out / "bird_keypoints.png").is_file()
    bad = subprocess.run(
        [str(fgloc_script), "localize", str(photo), "--method", "keypoints", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert bad.returncode == 2 and "needs --weights DIR" in bad.stderr
