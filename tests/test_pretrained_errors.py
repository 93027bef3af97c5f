"""`fgloc.pretrained`'s error paths (issue 13): unknown names, missing, corrupt and mis-fitting
weight files, and corrupt entries of the converted-weight cache (a fresh ``FGLOC_CACHE`` per
test). Source checkpoints (``.pth``) are converted offline (``fgloc convert``,
`weights_conversion.torchvision.convert_file`); their error paths are checked there."""

from __future__ import annotations

import pathlib
import re
import zipfile

import jax
import numpy as np
import pytest
from conftest import require_module

import fgloc
from fgloc.pretrained import load_variables
from fgloc.weights.io import ConversionError, flatten, save_variables
from fgloc.weights.torch_pickle import CheckpointError
from weights_conversion.torchvision import convert_file


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    path = tmp_path / "fgloc_cache"
    monkeypatch.setenv("FGLOC_CACHE", str(path))
    return path


def _names_file(path: pathlib.Path) -> str:
    return re.escape(str(path))


def test_unknown_name_and_architecture(tmp_path: pathlib.Path, cache: pathlib.Path):
    with pytest.raises(ValueError, match=r"unknown network 'resnet9000'; known: .*efficientnet"):
        fgloc.pretrained("resnet9000")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"whatever")
    with pytest.raises(ValueError, match=r"unknown network 'resnet9000'; known: .*vgg16"):
        fgloc.pretrained("resnet9000", weights=weights)
    with pytest.raises(ValueError, match=r"fgloc convert --arch alexnet --from torchvision"):
        fgloc.pretrained("alexnet", weights=weights)  # a source checkpoint: convert it first
    with pytest.raises(ValueError, match=r"needs weights=PATH"):
        fgloc.pretrained("caffe")
    assert not cache.exists()  # nothing converted, nothing cached


@pytest.mark.parametrize(("name", "file"), [("alexnet", "a.pth"), ("vgg16", "v.npz"),
                                            ("caffe", "net.npz")])  # fmt: skip
def test_missing_weight_file_names_it(tmp_path: pathlib.Path, name: str, file: str):
    path = tmp_path / file
    with pytest.raises(FileNotFoundError, match=_names_file(path)):
        fgloc.pretrained(name, weights=path)


def test_corrupt_pth_names_it(tmp_path: pathlib.Path, cache: pathlib.Path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"these are not the weights you are looking for\n" * 8)
    with pytest.raises(CheckpointError, match=_names_file(garbage) + ": not a torch checkpoint"):
        convert_file("alexnet", garbage)
    # A zip checkpoint cut short (e.g. an interrupted download) loses its central directory.
    cut = tmp_path / "cut.pth"
    with zipfile.ZipFile(cut, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 100)
        z.writestr("archive/version", b"3\n")
    cut.write_bytes(cut.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=_names_file(cut)):
        convert_file("alexnet", cut)
    assert not list(cache.glob("*.npz"))  # a failed conversion leaves no cache entry


@pytest.mark.torch
def test_truncated_torch_save_names_it(tmp_path: pathlib.Path, cache: pathlib.Path):
    torch = require_module("torch", "pip install '.[parity]'")
    path = tmp_path / "alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=_names_file(path)):
        convert_file("alexnet", path)


def _alexnet_conv_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A converted conv-only AlexNet ``.npz`` with zero weights (shapes from the model)."""
    from fgloc.models.alexnet import AlexNet
    from weights_conversion.torchvision import model_template

    flat = {
        k: np.zeros(v.shape, np.float32) for k, v in flatten(model_template(AlexNet(None))).items()
    }
    np.savez(path, **flat)  # pyright: ignore[reportArgumentType]
    return flat


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_npz_names_it(tmp_path: pathlib.Path, damage: str):
    """A damaged converted ``.npz`` is a ValueError naming the file, not a bare zipfile /
    pickle error from numpy."""
    path = tmp_path / "alexnet.npz"
    _alexnet_conv_npz(path)
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 64, "empty": b""}[damage]
    )
    with pytest.raises(ValueError, match=_names_file(path)):
        fgloc.pretrained("alexnet", weights=path)


def test_npz_that_does_not_fit_the_architecture(tmp_path: pathlib.Path):
    """A readable ``.npz`` of another network (here: AlexNet's with one kernel missing and one
    mis-shaped) is a ConversionError naming the file and the keys -- not a model that fails
    later inside ``apply``."""
    path = tmp_path / "wrong.npz"
    flat = _alexnet_conv_npz(path)
    del flat["params/conv5/kernel"]
    flat["params/conv1/bias"] = np.zeros(3, np.float32)
    np.savez(path, **flat)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ConversionError, match=_names_file(path)) as err:
        fgloc.pretrained("alexnet", weights=path)
    assert "params/conv5/kernel" in str(err.value) and "params/conv1/bias" in str(err.value)


def test_good_conv_only_npz_loads(tmp_path: pathlib.Path):
    path = tmp_path / "alexnet.npz"
    flat = _alexnet_conv_npz(path)
    p = fgloc.pretrained("alexnet", weights=path)
    assert p.class_names is None
    assert sorted(flatten(p.variables)) == sorted(flat)


def test_corrupt_cache_entry_is_rebuilt(cache: pathlib.Path):
    """Garbage, a truncation or an empty file in the cache entry: converted again, the entry
    rewritten, and the same variables returned."""
    first = fgloc.pretrained("efficientnet_lite0").variables
    (entry,) = cache.glob("*.npz")
    good = entry.read_bytes()
    want = jax.tree_util.tree_map(np.asarray, first)
    for damaged in (b"garbage" * 100, good[: len(good) // 3], b""):
        entry.write_bytes(damaged)
        again = fgloc.pretrained("efficientnet_lite0").variables
        jax.tree_util.tree_map(np.testing.assert_array_equal, want, again)
        assert sorted(cache.glob("*.npz")) == [entry]  # rebuilt in place, no stray files
        rebuilt = load_variables(entry)  # a complete, loadable entry again
        jax.tree_util.tree_map(np.testing.assert_array_equal, want, rebuilt)


@pytest.mark.torch
def test_conv_only_pth_with_num_classes_none(tmp_path: pathlib.Path, cache: pathlib.Path):
    """A torchvision AlexNet ``.pth`` holding only ``features.*`` (a conv backbone), converted,
    gives the conv-only model."""
    torch = require_module("torch", "pip install '.[parity]'")
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3),
              10: (256, 256, 3, 3)}  # fmt: skip
    sd = {}
    for i, shape in shapes.items():
        sd[f"features.{i}.weight"] = torch.full(shape, 0.5)
        sd[f"features.{i}.bias"] = torch.zeros(shape[0])
    path = tmp_path / "alexnet_conv.pth"
    torch.save(sd, path)
    npz = tmp_path / "alexnet_conv.npz"
    save_variables(npz, convert_file("alexnet", path))
    p = fgloc.pretrained("alexnet", weights=npz)
    assert p.class_names is None and "classifier" not in p.variables["params"]
    np.testing.assert_array_equal(p.variables["params"]["conv1"]["kernel"], 0.5)
