"""fgloc.pretrained and its converted-weight cache (issue 13, defect 3).

On 53914b5 the cache key was the source file's path, size and mtime: a changed converter, or a
file rewritten with the same size and mtime, kept serving the old conversion.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

from fgloc import registry

# The module (``fgloc.pretrained`` the attribute is the function of the same name).
P = importlib.import_module("fgloc.pretrained")


def _counting_convert(calls, value):
    def convert():
        calls.append(1)
        return {"params": {"w": np.full(3, value, np.float32)}}

    return convert


def test_cache_is_keyed_on_content_not_path_size_or_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("FGLOC_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "weights.bin"
    src.write_bytes(b"AAAA")
    st = os.stat(src)
    calls = []
    a = P._cached("net", str(src), _counting_convert(calls, 1.0), version=1)
    b = P._cached("net", str(src), _counting_convert(calls, 2.0), version=1)
    assert len(calls) == 1 and np.array_equal(a["params"]["w"], b["params"]["w"])
    # Same path, size and mtime, other content: must convert again.
    src.write_bytes(b"BBBB")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    c = P._cached("net", str(src), _counting_convert(calls, 3.0), version=1)
    assert len(calls) == 2 and c["params"]["w"][0] == 3.0


def test_cache_is_keyed_on_the_reader_version(tmp_path, monkeypatch):
    monkeypatch.setenv("FGLOC_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "weights.bin"
    src.write_bytes(b"AAAA")
    calls = []
    P._cached("net", str(src), _counting_convert(calls, 1.0), version=1)
    out = P._cached("net", str(src), _counting_convert(calls, 5.0), version=2)
    assert len(calls) == 2 and out["params"]["w"][0] == 5.0


def test_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FGLOC_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "weights.bin"
    src.write_bytes(b"AAAA")
    calls = []
    P._cached("net", str(src), _counting_convert(calls, 1.0), version=1)
    (entry,) = (tmp_path / "cache").glob("net-*.npz")
    entry.write_bytes(b"not a zip file")
    out = P._cached("net", str(src), _counting_convert(calls, 7.0), version=1)
    assert len(calls) == 2 and out["params"]["w"][0] == 7.0
    assert P.load_variables(entry)["params"]["w"][0] == 7.0  # rewritten


def test_embedded_model_cache_follows_the_reader_version(tmp_path, monkeypatch):
    """The real embedded model: a bumped reader version writes a new cache entry."""
    from fgloc.weights import efficientnet_lite

    monkeypatch.setenv("FGLOC_CACHE", str(tmp_path))
    P.pretrained("efficientnet_lite0")
    assert len(list(tmp_path.glob("efficientnet_lite0-*.npz"))) == 1
    monkeypatch.setattr(efficientnet_lite, "READER_VERSION", efficientnet_lite.READER_VERSION + 1)
    P.pretrained("efficientnet_lite0")
    assert len(list(tmp_path.glob("efficientnet_lite0-*.npz"))) == 2


def test_unknown_network_and_missing_or_unconverted_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown network 'resnet9'.*efficientnet_lite0"):
        P.pretrained("resnet9")
    with pytest.raises(ValueError, match="no packaged weights.*fgloc convert --arch vgg16"):
        P.pretrained("vgg16")
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        P.pretrained("vgg16", weights=tmp_path / "nothere.npz")
    pth = tmp_path / "v.pth"
    pth.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"fgloc convert --arch vgg16 --from torchvision .*v\.pth"):
        P.pretrained("vgg16", weights=pth)


def test_mismatched_and_corrupt_npz_weights_give_clear_errors(tmp_path):
    from fgloc.weights.io import ConversionError

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConversionError, match="bad.npz: not a readable .npz"):
        P.pretrained("alexnet", weights=bad)
    other = tmp_path / "other.npz"
    P.save_variables(other, {"params": {"conv1": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}}})
    with pytest.raises(
        ConversionError, match=r"(?s)other.npz does not match the model:.*missing keys"
    ):
        P.pretrained("alexnet", weights=other)


def test_every_registry_entry_states_its_facts():
    """One table: each network has a builder, preprocessing, input size; CAM networks name
    their classifier; conv-only ones say they have none."""
    for name, net in registry.NETWORKS.items():
        assert net.name == name and len(net.mean) == 3 and len(net.std) == 3
        assert (net.cam_layer is None) == (net.classifier is None)
    with pytest.raises(ValueError, match="'alexnet_lpips' has no classifier"):
        registry.get("alexnet_lpips").classifier_kernel({"params": {}})
