"""Tests for experiments/gradient_spread.py: analytic participation ratios, gate logging, smoke."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import gradient_spread as G


def test_participation_ratio_analytic():
    maps = np.zeros((4, 5, 8), np.float32)
    maps[0] = 1.0  # uniform: covers every pixel
    maps[1, 2, 3] = 7.0  # one pixel: 1 / (H W)
    maps[2, 0, :2] = 3.0  # two equal pixels: 2 / (H W)
    pr = np.asarray(G.participation_ratio(jnp.asarray(maps)))  # maps[3] all zero -> 0
    np.testing.assert_allclose(pr, [1.0, 1 / 40, 2 / 40, 0.0], rtol=1e-6)


def test_gate_log_follows_the_block_layout():
    """The recorder sees stem + (expansion) + depthwise gates per block + head, in that order."""
    import fgloc
    from fgloc.models import efficientnet_lite as E

    pre = fgloc.pretrained("efficientnet_lite0")
    x = np.asarray(pre.preprocess(np.full((1, 32, 32, 3), 128.0, np.float32)))
    log: list = []
    with G._recording_relu6(log):
        pre.model.apply(pre.variables, jnp.asarray(x), method=pre.model.features)
    assert E.relu6 is not None and E.relu6.__name__ == "relu6"
    specs = E.block_specs("lite0")
    assert len(log) == 1 + sum(2 if b[3] != 1 else 1 for b in specs) + 1
    assert log[0][0] == 16 * 16 * 32  # the stem: stride 2, 32 channels
    stats = G.gate_stats(pre, "stage7", x)
    units, zero, sat = np.asarray(log[:-1]).sum(axis=0)  # every gate but the head's
    assert stats["units"] == units
    assert stats["zero"] == pytest.approx(zero / units)
    assert stats["saturated"] == pytest.approx(sat / units)
    with pytest.raises(ValueError, match="must be 'stageN'"):
        G.gate_stats(pre, "block3", x)


def test_presets():
    from experiments.configs import gradient_spread as C

    default = C.get_config()
    assert [(c.backbone, c.layer, c.input_size) for c in default.candidates.values()] == [
        ("alexnet_lpips", "pool5", 227),
        ("efficientnet_lite0", "stage4", 224),
        ("efficientnet_lite0", "stage5", 224),
        ("efficientnet_lite0", "stage6", 224),
        ("efficientnet_lite0", "stage6", 320),
    ]
    assert (default.n_map_images, default.n_gate_images) == (4, 16)
    with pytest.raises(ValueError, match="unknown preset"):
        C.get_config("huge")


def test_smoke_run_on_real_cub(cub_dir, tmp_path):
    from experiments import common
    from experiments.configs import gradient_spread as C

    config = str(common.CONFIG_DIR / "gradient_spread.py") + ":smoke"
    argv = ["--config", config, "--workdir", str(tmp_path), "--data_dir", str(cub_dir.parent)]
    common.main(G.run, argv)
    m = json.loads((tmp_path / "metrics.json").read_text())
    names: list[str] = list(C.get_config("smoke").candidates.keys())
    for cand in names:
        assert 0.0 < m[f"{cand}.participation_ratio"] <= 1.0
        assert 0.0 <= m[f"{cand}.displacement"] < 1.5
        assert 0.0 < m[f"{cand}.gates.zero"] < 1.0
    assert m["candidates.lite0_stage6_64"] == "efficientnet_lite0:stage6:64"
    assert 0.0 <= m["lite0_stage6_64.gates.saturated"] < 1.0
    assert m["lite0_stage6_64.identity_skips"] > 0
