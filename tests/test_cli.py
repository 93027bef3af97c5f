"""The CLI end to end on real photos, including bad inputs that must not stop the others."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fgloc.cli import main


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.chelsea()).save(d / "chelsea.jpg")
    Image.fromarray(data.chelsea()).convert("L").save(d / "gray.png")
    rgba = np.dstack([data.coffee(), np.full(data.coffee().shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(d / "deep16.png")
    Image.fromarray(np.full((1, 1, 3), 128, np.uint8)).save(d / "one.png")
    (d / "notimage.jpg").write_text("this is text")
    return d


def test_localize_cam_good_and_bad_inputs(photos, tmp_path, capsys):
    names = [
        "chelsea.jpg",
        "gray.png",
        "missing.jpg",
        "rgba.png",
        "notimage.jpg",
        "deep16.png",
        "one.png",
    ]
    out = tmp_path / "out"
    code = main(["localize", *[str(photos / n) for n in names], "--out", str(out),
                 "--topk", "3", "--batch-size", "4", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1  # some inputs failed ...
    assert "missing.jpg: file not found" in err and "notimage.jpg: not a readable image" in err
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["image"].split("/")[-1] for r in rows] == [
        "chelsea.jpg",
        "gray.png",
        "rgba.png",
        "deep16.png",
        "one.png",
    ]
    cat = rows[0]
    assert (cat["width"], cat["height"], cat["method"]) == (451, 300, "cam")
    preds = cat["predictions"]
    assert len(preds) == 3 and 281 <= preds[0]["class"] <= 285  # a cat class
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)
    for r in rows:
        for p in r["predictions"]:
            x0, y0, x1, y1 = p["box"]
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
    # The cat fills most of the photo: the top-1 CAM box covers its head (centre of the photo).
    x0, y0, x1, y1 = preds[0]["box"]
    assert x0 < 225 < x1 and y0 < 150 < y1 and (x1 - x0) * (y1 - y0) > 0.3 * 451 * 300
    assert (out / "chelsea_cam.png").stat().st_size > 10_000


def test_localize_sensitivity(photos, tmp_path):
    out = tmp_path / "s"
    assert main(["localize", str(photos / "chelsea.jpg"), "--out", str(out), "--method",
                 "sensitivity", "--topk", "2", "--no-progress", "--batch-size", "1"]) == 0  # fmt: skip
    row = json.loads((out / "results.jsonl").read_text())
    assert row["method"] == "sensitivity" and len(row["predictions"]) == 2


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--topk", "0"], "--topk"),
        (["--threshold", "1.5"], "--threshold"),
        (["--input-size", "8"], "--input-size"),
    ],
)
def test_impossible_options(photos, tmp_path, capsys, args, match):
    assert main(["localize", str(photos / "one.png"), "--out", str(tmp_path), *args]) == 2
    assert match in capsys.readouterr().err


def test_overlay_size_is_bounded_for_extreme_aspect_ratios(tmp_path):
    """Issue 14: a 30000 × 40 panorama made a 1600 × 240048 PNG and held the run for minutes;
    the overlay is now a few hundred pixels on each side whatever the photo's shape."""
    from fgloc.app.localize_job import Localization
    from fgloc.app.overlays import save_overlay

    for h, w in ((40, 30000), (30000, 40)):
        photo = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
        res = Localization(
            image=f"pano_{h}x{w}.png", width=w, height=h, method="cam", classes=[1, 2],
            labels=["a", "b"], scores=[0.6, 0.3], boxes=[[0, 0, w, h], [w / 4, 0, w / 2, h]],
            maps=np.random.default_rng(1).random((2, 32, 32)).astype(np.float32), photo=photo,
        )  # fmt: skip
        path = tmp_path / f"o_{h}_{w}.png"
        save_overlay(res, path)
        with Image.open(path) as im:
            assert max(im.size) <= 800 and min(im.size) >= 60, im.size
