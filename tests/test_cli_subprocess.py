"""The console commands as a user types them, each in its own process (issue 13).

``fgloc`` is the console script next to ``sys.executable`` (``.venv/bin/fgloc`` after ``pip
install -e .``), ``python -m fgloc.cli`` the module form; both run this checkout (its root is put
first on ``PYTHONPATH``). The converted-weight cache is a fresh ``FGLOC_CACHE`` for the session,
so the first command converts the embedded model as a new user's first run does. Checked: exit
status 0 / 1 (some or all inputs failed) / 2 (impossible request), the output files, and that no
error reaches the user as a Python traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS, missing
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
FGLOC = pathlib.Path(sys.executable).with_name("fgloc")


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FGLOC_CACHE"}  # compilation cache kept
    env["FGLOC_CACHE"] = str(tmp_path_factory.mktemp("fgloc_cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if env.get("XLA_FLAGS") == TEST_XLA_FLAGS:
        del env["XLA_FLAGS"]  # conftest's virtual devices: a user's shell has none
    return env


@pytest.fixture(scope="session")
def fgloc_script() -> str:
    if not FGLOC.is_file():
        missing(f"console script {FGLOC} not found (pip install -e .)")
    return str(FGLOC)


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from skimage import data

    d = tmp_path_factory.mktemp("cli_photos")
    Image.fromarray(data.chelsea()).save(d / "chelsea.jpg")
    (d / "notimage.jpg").write_text("this is text")
    return d


def run(args: list[str], cwd: pathlib.Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr  # errors reach users as messages
    return proc


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fgloc_localize_as_in_the_readme(fgloc_script, photos, tmp_path, cli_env):
    """``fgloc localize IMAGE... --method cam --out DIR --topk K`` with the default model."""
    work = tmp_path
    (work / "chelsea.jpg").write_bytes((photos / "chelsea.jpg").read_bytes())
    proc = run([fgloc_script, "localize", "chelsea.jpg", "--method", "cam", "--out", "out",
                "--topk", "3", "--no-progress"], work, cli_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "1 image(s) localized with cam; results in out/results.jsonl" in proc.stdout
    (row,) = _rows(work / "out" / "results.jsonl")
    assert (row["image"], row["width"], row["height"]) == ("chelsea.jpg", 451, 300)
    preds = row["predictions"]
    assert len(preds) == 3 and 281 <= preds[0]["class"] <= 285  # a cat class
    for p in preds:
        x0, y0, x1, y1 = p["box"]
        assert 0 <= x0 < x1 <= 451 and 0 <= y0 < y1 <= 300
    with Image.open(work / "out" / "chelsea_cam.png") as im:
        assert im.width > 3 * im.height  # one panel per class, side by side


def test_python_m_fgloc_cli(photos, tmp_path, cli_env):
    """The module form, on a good and a bad image: exit 1, the good one's result written."""
    proc = run([sys.executable, "-m", "fgloc.cli", "localize", str(photos / "chelsea.jpg"),
                str(photos / "notimage.jpg"), "--out", "o", "--topk", "1", "--input-size", "64",
                "--no-progress"], tmp_path, cli_env)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "notimage.jpg: not a readable image" in proc.stderr
    assert "1 image(s) could not be read" in proc.stderr
    (row,) = _rows(tmp_path / "o" / "results.jsonl")
    assert row["image"].endswith("chelsea.jpg") and len(row["predictions"]) == 1
    assert (tmp_path / "o" / "chelsea_cam.png").is_file()


def test_fgloc_demo_smoke(fgloc_script, tmp_path, cli_env):
    """The README's first command, ``fgloc demo --out fgloc_demo``, at a small input size."""
    proc = run([fgloc_script, "demo", "--out", "fgloc_demo", "--input-size", "64", "--topk", "1",
                "--batch-size", "5", "--no-progress"], tmp_path, cli_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    demo = tmp_path / "fgloc_demo"
    for method in ("cam", "sensitivity"):
        rows = _rows(demo / method / "results.jsonl")
        assert [pathlib.Path(r["image"]).stem for r in rows] == [
            "astronaut",
            "chelsea",
            "coffee",
            "rocket",
            "motorcycle",
        ]
        assert all(r["method"] == method and len(r["predictions"]) == 1 for r in rows)
        assert len(list((demo / method).glob("*.png"))) == 5
    assert "demo pictures: fgloc_demo/cam/*.png and fgloc_demo/sensitivity/*.png" in proc.stdout


def test_every_input_fails_exit_status_1(fgloc_script, photos, tmp_path, cli_env):
    proc = run([fgloc_script, "localize", "missing.jpg", str(photos / "notimage.jpg"),
                "--out", "out", "--no-progress"], tmp_path, cli_env)  # fmt: skip
    assert proc.returncode == 1
    assert "fgloc: skipped missing.jpg: file not found" in proc.stderr
    assert "notimage.jpg: not a readable image" in proc.stderr
    assert "2 image(s) could not be read" in proc.stderr
    assert "0 image(s) localized" in proc.stdout
    assert (tmp_path / "out" / "results.jsonl").read_text() == ""


def test_unknown_model_exit_status_2(photos, tmp_path, cli_env):
    proc = run([sys.executable, "-m", "fgloc.cli", "localize", str(photos / "chelsea.jpg"),
                "--out", "out", "--model", "resnet9000"], tmp_path, cli_env)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("fgloc: error: unknown network 'resnet9000'")
    assert "efficientnet_lite0" in proc.stderr  # the message lists the choices
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["cam", "sensitivity"])
def test_model_without_classifier_exit_status_2(fgloc_script, photos, tmp_path, cli_env, method):
    """``alexnet_lpips`` is conv layers only: a clear error naming the model, no output folder."""
    proc = run([fgloc_script, "localize", str(photos / "chelsea.jpg"), "--out", "out",
                "--model", "alexnet_lpips", "--method", method], tmp_path, cli_env)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("fgloc: error: model alexnet_lpips has no classifier")
    assert f"--method {method} needs class scores" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for an impossible request


def test_bad_weights_file_exit_status_2(fgloc_script, photos, tmp_path, cli_env):
    """``--weights`` that is missing, an unconverted source checkpoint, or a damaged ``.npz``:
    exit 2 and an error naming the file (and, for a ``.pth``, the command that converts it)."""
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint\n" * 8)
    np.savez(tmp_path / "good.npz", a=np.zeros(3))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:100])
    for weights, message in [
        ("missing.pth", "weights file not found: missing.pth"),
        (
            "garbage.pth",
            "garbage.pth: fgloc.pretrained reads converted .npz files; convert the "
            "checkpoint first: fgloc convert --arch alexnet --from torchvision garbage.pth",
        ),
        ("cut.npz", "cut.npz"),
    ]:
        proc = run([fgloc_script, "localize", str(photos / "chelsea.jpg"), "--out", "out",
                    "--model", "alexnet", "--weights", weights], tmp_path, cli_env)  # fmt: skip
        assert proc.returncode == 2, (weights, proc.stderr)
        assert proc.stderr.startswith("fgloc: error:") and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [[], ["localize"], ["demo"], ["convert"]], ids=" ".join)
def test_help(fgloc_script, tmp_path, cli_env, command):
    proc = run([fgloc_script, *command, "--help"], tmp_path, cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fgloc"), proc.stdout


def test_cub_summary_as_in_the_readme(shared_data, cli_env):
    """``python -m fgloc.data.cub --data_dir ../shared/data --summary`` from the repo root;
    the split sizes are counted here from ``train_test_split.txt``."""
    split = np.loadtxt(shared_data / "CUB_200_2011" / "train_test_split.txt", dtype=int)
    n_train = int(split[:, 1].sum())
    proc = run([sys.executable, "-m", "fgloc.data.cub", "--data_dir", "../shared/data",
                "--summary"], REPO, cli_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"train: {n_train}" in lines and f"test: {len(split) - n_train}" in lines
    assert f"total: {len(split)}" in lines


def test_localize_checks_options_before_reading_images(cli_env, monkeypatch):
    """The library call raises at once (not at the first ``next``) for a net without classes."""
    import fgloc

    monkeypatch.setenv("FGLOC_CACHE", cli_env["FGLOC_CACHE"])
    from fgloc.app.localize_job import localize

    net = fgloc.pretrained("alexnet_lpips")
    with pytest.raises(ValueError, match="model alexnet_lpips has no classifier"):
        localize(net, ["never/read.jpg"])
    with pytest.raises(ValueError, match="--topk"):
        localize(fgloc.pretrained("efficientnet_lite0"), [], topk=0)
