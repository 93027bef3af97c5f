"""Hand-computed cases for fgloc.metrics (every expected number is worked out in a comment)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.measure

from fgloc import metrics as M
from fgloc.data import cub_parts

# ------------------------------------------------------------------------------------------------
# IoU, CorLoc, centre box, ILSVRC errors
# ------------------------------------------------------------------------------------------------


def test_iou_hand_cases_and_broadcasting():
    a = np.array([0.0, 0.0, 2.0, 2.0])
    # overlap 1x1 = 1, union 4 + 4 - 1 = 7
    assert M.iou(a, [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert M.iou(a, a) == pytest.approx(1.0)
    assert M.iou(a, [2, 0, 4, 2]) == 0.0  # touching edges: exclusive ends, no overlap
    assert M.iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0  # two empty boxes: 0, not NaN
    assert M.iou([0, 0, 4, 4], [1, 1, 2, 2]) == pytest.approx(1 / 16)  # containment
    assert M.iou([3, 3, 1, 1], [0, 0, 4, 4]) == 0.0  # inverted box is empty
    aa = np.array([[[0, 0, 2, 2]], [[0, 0, 1, 1]], [[5, 5, 6, 6]]], float)  # (3, 1, 4)
    bb = np.array([[[0, 0, 2, 2], [0, 0, 1, 2]]], float)  # (1, 2, 4)
    want = np.array([[1.0, 0.5], [0.25, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(M.iou(aa, bb), want)
    with pytest.raises(ValueError, match="a: expected boxes"):
        M.iou(np.zeros((2, 3)), np.zeros(4))


def test_corloc_ragged_ground_truth_and_threshold_tie():
    pred = np.array(
        [
            [0, 0, 4, 1],  # vs [0,0,4,2]: IoU 4/8 = 0.5 exactly -> hit (>=)
            [10, 10, 20, 20],  # second gt box matches -> hit
            [0, 0, 5, 5],  # image without boxes -> miss
            [0, 0, 3, 3],  # vs [0,0,4,4]: 9/16 -> hit at 0.5, miss at 0.6
        ],
        float,
    )
    gt = [
        np.array([[0, 0, 4, 2]]),
        np.array([[50, 50, 60, 60], [10, 10, 20, 20]]),
        np.zeros((0, 4)),
        [[0, 0, 4, 4]],
    ]
    np.testing.assert_allclose(M.best_iou(pred, gt), [0.5, 1.0, 0.0, 9 / 16])
    assert M.corloc(pred, gt) == pytest.approx(3 / 4)
    assert M.corloc(pred, gt, iou_threshold=0.6) == pytest.approx(1 / 4)
    assert M.gt_known_loc_acc(pred, gt) == pytest.approx(3 / 4)
    # (N, 4) ground truth is one box per image
    assert M.corloc(pred[:2], pred[:2]) == 1.0
    with pytest.raises(ValueError, match="gt_boxes: 3 entries for 4 images"):
        M.corloc(pred, gt[:3])
    with pytest.raises(ValueError, match=r"gt_boxes\[1\]"):
        M.corloc(pred[:2], [[[0, 0, 1, 1]], [[0, 0, 1]]])


def test_center_box_baseline_hand_computed():
    train = np.array([[10, 20, 60, 70], [0, 0, 100, 50]], float)
    sizes = np.array([[100, 200], [100, 100]], float)  # (H, W)
    # relative widths 50/200 = 0.25 and 100/100 = 1 -> 0.625; heights 50/100, 50/100 -> 0.5
    out = M.center_box_baseline(train, sizes, [[40, 80], [10, 10]])
    # (H, W) = (40, 80): w = 50, h = 20, centred at (40, 20) -> [15, 10, 65, 30]
    # (10, 10): w = 6.25, h = 5 at (5, 5) -> [1.875, 2.5, 8.125, 7.5]
    np.testing.assert_allclose(out, [[15, 10, 65, 30], [1.875, 2.5, 8.125, 7.5]])
    # a training set of whole-image boxes gives the whole image (box touching every border)
    full = M.center_box_baseline([[0, 0, 8, 6]], [[6, 8]], [[30, 20]])
    np.testing.assert_allclose(full, [[0, 0, 20, 30]])
    with pytest.raises(ValueError, match="train_sizes"):
        M.center_box_baseline(train, sizes[:1], [[1, 1]])


def test_localization_error_hand_computed():
    good, bad = [0, 0, 10, 10], [50, 50, 60, 60]
    classes = np.array([[5, 1, 2, 3, 4], [1, 5, 2, 3, 4], [1, 2, 5, 3, 4]])
    boxes = np.array(
        [
            [good, bad, bad, bad, bad],  # right class + right box first: top-1 correct
            [good, bad, bad, bad, bad],  # right box has wrong class; right class has bad box
            [bad, bad, good, bad, bad],  # right class and box at guess 3: top-5 correct
        ],
        float,
    )
    labels = np.array([5, 5, 5])
    gt = [np.array([good]), np.array([good]), np.array([bad, good])]
    out = M.localization_error(classes, boxes, labels, gt)
    assert out["top1_loc_err"] == pytest.approx(2 / 3)
    assert out["top5_loc_err"] == pytest.approx(1 / 3)
    assert out["top1_cls_err"] == pytest.approx(2 / 3)
    assert out["top5_cls_err"] == 0.0
    with pytest.raises(ValueError, match="K >= 5"):
        M.localization_error(classes[:, :3], boxes[:, :3], labels, gt)


# ------------------------------------------------------------------------------------------------
# Boxes at thresholds and MaxBoxAccV2
# ------------------------------------------------------------------------------------------------


def _two_blob_map() -> np.ndarray:
    m = np.zeros((6, 8))
    m[1:3, 1:3] = 0.9  # blob A: rows 1-2, cols 1-2
    m[2, 3] = 0.6  # extends A to col 3
    m[4, 5:8] = 0.5  # blob B: row 4, cols 5-7 (touches the right border)
    m[3, 4] = 0.3  # diagonal bridge A-B, only at low thresholds (8-connectivity)
    return m


def test_boxes_at_thresholds_hand_computed():
    boxes, t = M.boxes_at_thresholds(_two_blob_map(), [0.0, 0.4, 0.55, 0.95])
    # t=0: one component through the diagonal bridge; t=0.4: A and B; t=0.55: A; t=0.95: none
    np.testing.assert_array_equal(t, [0, 1, 1, 2])
    np.testing.assert_array_equal(boxes, [[1, 1, 8, 5], [1, 1, 4, 3], [5, 4, 8, 5], [1, 1, 4, 3]])
    boxes, t = M.boxes_at_thresholds(_two_blob_map(), [0.4], largest_only=True)
    np.testing.assert_array_equal(boxes, [[1, 1, 4, 3]])  # A has 5 pixels, B 3
    # equal areas: the first component in raster order wins
    tie = np.zeros((5, 5))
    tie[3, 3:5] = 1
    tie[0, 0:2] = 1
    boxes, _ = M.boxes_at_thresholds(tie, [0.5], largest_only=True)
    np.testing.assert_array_equal(boxes, [[0, 0, 2, 1]])
    boxes, t = M.boxes_at_thresholds(np.zeros((4, 4)), [0.0, 0.5])  # empty map: no box
    assert boxes.shape == (0, 4) and t.shape == (0,)


def test_boxes_at_thresholds_matches_skimage_regionprops():
    rng = np.random.default_rng(0)
    score = ndi.gaussian_filter(rng.random((40, 50)), 2.0)
    score = (score - score.min()) / (score.max() - score.min())
    thresholds = np.linspace(0, 0.95, 20)
    boxes, t_idx = M.boxes_at_thresholds(score, thresholds)
    for k, thr in enumerate(thresholds):
        lab = skimage.measure.label(score > thr, connectivity=2)
        want = sorted(
            (r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2]) for r in skimage.measure.regionprops(lab)
        )
        got = sorted(tuple(int(v) for v in b) for b in boxes[t_idx == k])
        assert got == want


def _blob_map(shape, *blobs):
    m = np.zeros(shape)
    for (x0, y0, x1, y1), v in blobs:
        m[y0:y1, x0:x1] = v
    return m


def test_max_box_acc_v2_hand_computed():
    gt1, gt2 = [4, 4, 12, 12], [0, 0, 4, 4]
    map1 = _blob_map((20, 20), (gt1, 1.0))  # exact box at every threshold
    # map2: the object at 0.5 (16 px) and a larger distractor at 1.0 (36 px, separate)
    map2 = _blob_map((20, 20), (gt2, 0.5), ([10, 10, 16, 16], 1.0))
    thresholds = [0.0, 0.25, 0.5, 0.75]
    v2 = M.max_box_acc_v2(np.stack([map1, map2]), [[gt1], [gt2]], cam_thresholds=thresholds)
    # map2 right (all components, best match) only while the object survives (tau < 0.5)
    np.testing.assert_allclose(v2.curves, [[1, 1, 0.5, 0.5]] * 3)
    assert v2.value == 1.0
    assert v2.best_threshold == {0.3: 0.0, 0.5: 0.0, 0.7: 0.0}
    assert v2.count == 2
    v1 = M.max_box_acc_v2(
        np.stack([map1, map2]),
        [[gt1], [gt2]],
        cam_thresholds=thresholds,
        all_components=False,
        iou_thresholds=(0.5,),
    )
    assert v1.value == 0.5  # the largest component of map2 is always the distractor


def test_max_box_acc_v2_averages_iou_thresholds():
    # box [0,0,10,6] vs gt [0,0,10,10]: IoU 0.6, right at 0.3 and 0.5, wrong at 0.7
    m = _blob_map((16, 16), ([0, 0, 10, 6], 1.0))  # box touches the top-left border
    res = M.max_box_acc_v2(m[None], [[[0, 0, 10, 10]]])
    assert res.per_iou == {0.3: 1.0, 0.5: 1.0, 0.7: 0.0}
    assert res.value == pytest.approx(2 / 3)
    assert res.curves.shape == (3, 100)
    # min-max normalisation: an affine rescale changes nothing
    res2 = M.max_box_acc_v2(7.0 * m[None] - 3.0, [[[0, 0, 10, 10]]])
    np.testing.assert_array_equal(res.curves, res2.curves)
    # constant (empty) map: no box at any threshold, never correct
    flat = M.max_box_acc_v2(np.zeros((1, 16, 16)), [[[0, 0, 10, 10]]])
    assert flat.value == 0.0


def test_max_box_acc_v2_streaming_equals_batch_and_brute_force():
    rng = np.random.default_rng(1)
    maps = ndi.gaussian_filter(rng.random((6, 32, 32)), (0, 3, 3))
    gts = [rng.integers(0, 16, (int(k), 2)) for k in rng.integers(1, 3, 6)]
    gts = [np.concatenate([g, g + rng.integers(4, 16, g.shape)], axis=1) for g in gts]
    whole = M.max_box_acc_v2(maps, gts)
    acc = M.MaxBoxAccV2()
    acc.update(maps[:2], gts[:2])
    acc.update(maps[2:], gts[2:])
    np.testing.assert_array_equal(acc.compute().curves, whole.curves)
    # brute force: one skimage labelling per (map, threshold)
    thr = np.arange(100) / 100
    correct = np.zeros((3, 100))
    for m, g in zip(maps, gts):
        m = (m - m.min()) / (m.max() - m.min())
        for k, t in enumerate(thr):
            props = skimage.measure.regionprops(skimage.measure.label(m > t, connectivity=2))
            cand = np.array([(p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2]) for p in props], float)
            best = M.iou(cand[:, None], g[None].astype(float)).max() if len(cand) else 0.0
            correct[:, k] += best >= np.array([0.3, 0.5, 0.7])
    np.testing.assert_allclose(whole.curves, correct / 6)
    acc.reset()
    with pytest.raises(ValueError, match="no maps were added"):
        acc.compute()


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------


def _pck_case():
    true = np.zeros((2, 3, 2))
    pred = np.zeros((2, 3, 2))
    pred[0, 0] = [6, 8]  # distance 10
    pred[0, 1] = [10.01, 0]  # 10.01
    pred[0, 2] = [1e6, 1e6]  # invisible, ignored
    pred[1, 0] = [3, 4]  # 5
    pred[1, 1] = [0, 3]  # 3
    visible = np.array([[True, True, False], [True, True, True]])
    boxes = np.array([[0, 0, 100, 50], [0, 0, 20, 40]], float)  # max side 100 and 40
    return pred, true, visible, boxes


def test_pck_hand_computed():
    pred, true, visible, boxes = _pck_case()
    # alpha 0.1: thresholds 10 px and 4 px. Image 0: 10 <= 10 yes, 10.01 no. Image 1: 5 no,
    # 3 yes, 0 yes. Per part: [1/2, 1/2, 1/1]; mean over parts 2/3; pooled 3/5.
    per_part, mean = M.pck(pred, true, visible, boxes, alpha=0.1)
    np.testing.assert_allclose(per_part, [0.5, 0.5, 1.0])
    assert mean == pytest.approx(2 / 3)
    _, pooled = M.pck(pred, true, visible, boxes, alpha=0.1, average="pooled")
    assert pooled == pytest.approx(3 / 5)
    # a part never visible is NaN and skipped by the mean, without a RuntimeWarning
    vis = visible.copy()
    vis[:, 1] = False
    per_part, mean = M.pck(pred, true, vis, boxes, alpha=0.1)
    assert math.isnan(per_part[1]) and mean == pytest.approx(0.75)
    per_part, mean = M.pck(pred, true, np.zeros_like(visible), boxes)
    assert np.all(np.isnan(per_part)) and math.isnan(mean)
    with pytest.raises(ValueError, match="visible: expected"):
        M.pck(pred, true, visible[:, :2], boxes)


def test_normalized_part_error_hand_computed():
    pred, true, visible, _ = _pck_case()
    boxes = np.array([[0, 0, 30, 40], [5, 5, 11, 13]], float)  # diagonals 50 and 10
    per_part, mean = M.normalized_part_error(pred, true, visible, boxes)
    # part 0: (10/50 + 5/10)/2 = 0.35; part 1: (10.01/50 + 3/10)/2 = 0.2501; part 2: 0/10 = 0
    np.testing.assert_allclose(per_part, [0.35, 0.2501, 0.0])
    assert mean == pytest.approx((0.35 + 0.2501) / 3)
    _, pooled = M.normalized_part_error(pred, true, visible, boxes, average="pooled")
    assert pooled == pytest.approx((0.2 + 0.2002 + 0.5 + 0.3 + 0.0) / 5)
    with pytest.raises(ValueError, match="zero size"):
        M.normalized_part_error(pred, true, visible, np.zeros((2, 4)))


def _part(name: str) -> int:
    return M.CUB_PART_NAMES.index(name)


def _cub_keypoints():
    """Two birds: head keypoints spanning [10,10,20,20], body keypoints spanning [0,20,40,40];
    the throat, in both groups (Part-based R-CNN's boxes), at (20, 20) lies in both boxes."""
    kp = np.zeros((2, 15, 2))
    kp[:, list(M.CUB_PART_GROUPS["head"])] = 15.0
    kp[:, list(M.CUB_PART_GROUPS["body"])] = [20, 30]
    for name, xy in {
        "beak": (10, 10),
        "crown": (20, 20),
        "throat": (20, 20),
        "back": (0, 20),
        "belly": (40, 40),
    }.items():
        kp[:, _part(name)] = xy
    return kp


def test_pcp_groups_are_part_based_rcnn_boxes():
    """The head and body of Part-based R-CNN's released boxes (read off its annotations on the
    25-class subset): the body has the legs and the throat; the head shares the throat."""
    names = {g: {M.CUB_PART_NAMES[i] for i in idx} for g, idx in M.CUB_PART_GROUPS.items()}
    assert names["head"] == {"beak", "crown", "forehead", "left eye", "right eye", "nape", "throat"}
    assert names["body"] == {
        *("back", "belly", "breast", "tail", "throat"),
        *("left leg", "right leg", "left wing", "right wing"),
    }
    assert M.PCP_MIN_VISIBLE == 3 and M.PCP_DEFINITIONS["prcnn"] == (M.CUB_PART_GROUPS, 3)
    torso, k = M.PCP_DEFINITIONS["torso"]
    assert k == 2 and torso is cub_parts.CUB_PART_GROUPS_TORSO
    assert {M.CUB_PART_NAMES[i] for i in torso["body"]} == names["body"] - {
        *("left leg", "right leg", "throat")
    }


def test_part_boxes_and_pcp_hand_computed():
    true = _cub_keypoints()
    head, body = (list(M.CUB_PART_GROUPS[g]) for g in ("head", "body"))
    visible = np.ones((2, 15), bool)
    visible[1, head] = False
    visible[1, [_part("beak"), _part("crown")]] = True  # bird 1: two head keypoints only
    boxes, valid = M.part_boxes_from_keypoints(true, visible)
    np.testing.assert_array_equal(boxes[0], [[10, 10, 20, 20], [0, 20, 40, 40]])
    np.testing.assert_array_equal(valid, [[True, True], [False, True]])
    # two keypoints make a box only when asked (the torso definition's rule)
    boxes2, valid2 = M.part_boxes_from_keypoints(true, visible, min_visible=2)
    assert valid2.all() and boxes2[1, 0].tolist() == [10, 10, 20, 20]
    # three make one: back, belly, tail
    three = np.zeros((1, 15), bool)
    three[0, [_part("back"), _part("belly"), _part("tail")]] = True
    assert M.part_boxes_from_keypoints(true[:1], three)[1].tolist() == [[False, True]]
    three[0, _part("tail")] = False
    assert M.part_boxes_from_keypoints(true[:1], three)[1].tolist() == [[False, False]]

    pred = true.copy()
    pred[0, head] += [2, 0]  # head box [12,10,22,20]: IoU 80/120 -> hit (throat stays in body)
    pred[1, body] += [0, 10]  # body [0,30,40,50]: IoU 400/1200 -> miss
    out = M.pcp(pred, true, visible)
    assert out == {"head": 1.0, "body": 0.5, "mean": 0.75}
    pred[0, head] += [3, 0]  # head now [15,10,25,20]: IoU 50/150 -> miss
    assert M.pcp(pred, true, visible)["head"] == 0.0
    # the left leg is in Part-based R-CNN's body, not in the torso's
    leg = true.copy()
    leg[0, _part("left leg")] = [1e4, 1e4]
    assert M.pcp(leg, true, visible)["body"] == 0.5
    torso, k = M.PCP_DEFINITIONS["torso"]
    assert M.pcp(leg, true, visible, torso, min_visible=k) == {
        "head": 1.0,
        "body": 1.0,
        "mean": 1.0,
    }
    # an invisible part's (wild) prediction does not enter the predicted box
    vis = visible.copy()
    vis[0, _part("breast")] = False
    pred2 = true.copy()
    pred2[0, _part("breast")] = [500, 500]
    assert M.pcp(pred2, true, vis)["body"] == 1.0
    none = M.pcp(pred, true, np.zeros((2, 15), bool))
    assert math.isnan(none["head"]) and math.isnan(none["mean"])
    with pytest.raises(ValueError, match="groups"):
        M.part_boxes_from_keypoints(true, visible, {"x": (0, 15)})
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="min_visible"):
            M.pcp(pred, true, visible, min_visible=bad)  # pyright: ignore[reportArgumentType]


# ------------------------------------------------------------------------------------------------
# Pointing game
# ------------------------------------------------------------------------------------------------


def test_pointing_game_tolerance_ties_and_empty_maps():
    m = np.zeros((10, 10))
    m[2, 7] = 1.0  # max at x=7, y=2
    box = [[0, 0, 5, 5]]  # pixels 0..4: distance from x=7 to x=4 is 3
    assert not M.pointing_game(m[None], [box], tolerance=3)[0]  # strict: 9 < 9 is false
    assert M.pointing_game(m[None], [box], tolerance=3.01)[0]
    assert M.pointing_game(m[None], [[[5, 0, 8, 3]]], tolerance=0)[0]  # inside counts
    assert M.pointing_game(m[None], [[[7.4, 2.4, 8, 3]]], tolerance=0)[0]  # pixel centre 7.5
    assert not M.pointing_game(m[None], [[[7.6, 2, 8, 3]]], tolerance=0)[0]
    # box touching the border, maximum in the corner pixel
    corner = np.zeros((10, 10))
    corner[9, 9] = 2.0
    assert M.pointing_game(corner[None], [[[5, 5, 10, 10]]], tolerance=0)[0]
    # ties: maxima at (x=9, y=0) (first in raster order) and (x=2, y=5)
    tie = np.zeros((10, 10))
    tie[0, 9] = tie[5, 2] = 1.0
    near = [[[1, 4, 4, 7]]]
    assert not M.pointing_game(tie[None], near, tolerance=1, ties="first")[0]
    assert M.pointing_game(tie[None], near, tolerance=1, ties="any")[0]
    # constant maps and images without boxes are misses
    hits = M.pointing_game(
        np.stack([np.zeros((10, 10)), np.full((10, 10), 3.0), m]),
        [box, box, np.zeros((0, 4))],
        tolerance=100,
        ties="any",
    )
    np.testing.assert_array_equal(hits, [False, False, False])


def test_pointing_game_first_equals_any_for_unique_maxima():
    rng = np.random.default_rng(2)
    maps = rng.random((20, 16, 16))
    gt = [rng.integers(0, 12, (2, 2)) for _ in range(20)]
    gt = [np.concatenate([g, g + 4], axis=1) for g in gt]
    first = M.pointing_game(maps, gt, tolerance=2.5)
    anyt = M.pointing_game(maps, gt, tolerance=2.5, ties="any")
    np.testing.assert_array_equal(first, anyt)
    assert 0 < first.sum() < 20  # both outcomes occur in this fixture


# ------------------------------------------------------------------------------------------------
# Deletion / insertion
# ------------------------------------------------------------------------------------------------


def _mean_predictor(calls: list[int] | None = None):
    """p(class 0) = mean pixel value, p(class 1) = 1 - that."""

    def predict(x):
        if calls is not None:
            calls.append(x.shape[0])
        p0 = np.asarray(x, float).mean(axis=(1, 2, 3))
        return np.stack([p0, 1 - p0], axis=1)

    return predict


def test_deletion_insertion_hand_computed():
    image = np.array([[0.4, 0.3], [0.2, 0.1]])[None, :, :, None]  # mean 0.25
    calls: list[int] = []
    predict = _mean_predictor(calls)
    # deletion of the brightest first: means 0.25, 0.15, 0.075, 0.025, 0
    # AUC = (0.5 - 0.25/2 - 0/2) / 4 = 0.09375
    res = M.deletion_insertion_auc(predict, image, image[..., 0], "deletion", step=1, labels=[0])
    np.testing.assert_allclose(res.curves, [[0.25, 0.15, 0.075, 0.025, 0.0]])
    np.testing.assert_allclose(res.auc, [0.09375])
    # reversed saliency deletes the darkest first: 0.25, 0.225, 0.175, 0.1, 0 -> AUC 0.15625
    rev = M.deletion_insertion_auc(predict, image, -image[..., 0], "deletion", step=1, labels=[0])
    np.testing.assert_allclose(rev.auc, [0.15625])
    # ties keep raster order: a flat map deletes 0.4, 0.3, 0.2, 0.1 in turn
    flat = M.deletion_insertion_auc(predict, image, np.ones((1, 2, 2)), "deletion", 1, [0])
    np.testing.assert_allclose(flat.curves, res.curves)
    # insertion onto zeros: 0, 0.1, 0.175, 0.225, 0.25 -> AUC (0.75 - 0.125) / 4
    ins = M.deletion_insertion_auc(
        predict, image, image[..., 0], "insertion", step=1, labels=[0], baseline="zeros"
    )
    np.testing.assert_allclose(ins.curves, [[0.0, 0.1, 0.175, 0.225, 0.25]])
    np.testing.assert_allclose(ins.auc, [0.15625])
    # step 3 on 4 pixels: 2 steps changing 0, 3, 4 pixels -> 0.25, 0.025, 0 -> AUC 0.075
    coarse = M.deletion_insertion_auc(predict, image, image[..., 0], "deletion", 3, [0])
    np.testing.assert_allclose(coarse.curves, [[0.25, 0.025, 0.0]])
    np.testing.assert_allclose(coarse.auc, [0.075])
    # an explicit baseline (constant 0.5) instead of zeros
    half = M.deletion_insertion_auc(
        predict, image, image[..., 0], "deletion", 2, [0], baseline=np.full((1, 1, 1, 1), 0.5)
    )
    np.testing.assert_allclose(half.curves, [[0.25, (0.5 + 0.5 + 0.2 + 0.1) / 4, 0.5]])


def test_deletion_insertion_batches_labels_and_jax_predict_fn():
    image = np.array([[0.4, 0.3], [0.2, 0.1]])[None, :, :, None]
    images = np.concatenate([image, 1 - image])  # means 0.25 and 0.75
    sal = images[..., 0]
    calls: list[int] = []
    res = M.deletion_insertion_auc(
        _mean_predictor(calls), images, sal, "deletion", step=1, batch_size=3
    )
    np.testing.assert_array_equal(res.labels, [1, 0])  # top-1 of the intact images
    assert set(calls) == {3}  # every call padded to the fixed batch size
    assert len(calls) == 1 + 4  # labels, then 10 (image, step) pairs in batches of 3
    # image 0 followed as class 1: 1 - deletion curve of the hand case
    np.testing.assert_allclose(res.curves[0], 1 - np.array([0.25, 0.15, 0.075, 0.025, 0.0]))
    # image 1 = [[0.6, 0.7], [0.8, 0.9]] deleted brightest first, class 0
    np.testing.assert_allclose(res.curves[1], [0.75, 0.525, 0.325, 0.15, 0.0])
    jit_predict = jax.jit(
        lambda x: jnp.stack([x.mean(axis=(1, 2, 3)), 1 - x.mean(axis=(1, 2, 3))], axis=1)
    )
    res_jax = M.deletion_insertion_auc(
        jit_predict, images.astype(np.float32), sal, "deletion", step=1, batch_size=3
    )
    np.testing.assert_allclose(res_jax.auc, res.auc, rtol=1e-6)
    with pytest.raises(ValueError, match="saliency: expected"):
        M.deletion_insertion_auc(jit_predict, images, sal[:, :1], "deletion")
    with pytest.raises(ValueError, match="mode"):
        M.deletion_insertion_auc(jit_predict, images, sal, "erase")  # type: ignore[arg-type]


def test_blur_baseline_is_normalised_truncated_gaussian():
    impulse = np.zeros((1, 21, 21, 2))
    impulse[0, 10, 10, :] = 1.0
    out = M.blur_baseline(impulse)
    k = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 5.0**2))
    k /= k.sum()
    want = np.zeros((21, 21))
    want[5:16, 5:16] = np.outer(k, k)  # radius 5 -> 11 x 11 support
    np.testing.assert_allclose(out[0, :, :, 0], want, atol=1e-12)
    np.testing.assert_allclose(out[0, :, :, 1], want, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Real data: simple baselines on the CUB subset in ../shared/data (skips when absent, fails in CI)
# ------------------------------------------------------------------------------------------------


def _cub_baselines_from_text_files(cub_dir) -> dict[str, float]:
    """The baselines of `test_cub_baselines` with numpy alone, straight from CUB's text files.

    No fgloc code: ``images.txt``, ``bounding_boxes.txt`` (``id x y w h``),
    ``train_test_split.txt``, ``parts/part_locs.txt`` (``id part x y visible``), image sizes from
    the JPEG headers (PIL). Boxes are ``[x, y, x + w, y + h]`` clipped to the image.
    """
    from PIL import Image

    ids, paths = zip(
        *(line.split() for line in (cub_dir / "images.txt").read_text().split("\n") if line)
    )
    order = np.argsort(np.asarray(ids, int))
    sizes = []
    for path in np.asarray(paths)[order]:
        with Image.open(cub_dir / "images" / path) as im:
            sizes.append((im.width, im.height))
    wh = np.asarray(sizes, float)  # (N, 2) as (W, H)
    xywh = np.loadtxt(cub_dir / "bounding_boxes.txt")
    xywh = xywh[np.argsort(xywh[:, 0])][:, 1:]
    box = np.concatenate([xywh[:, :2], np.minimum(xywh[:, :2] + xywh[:, 2:], wh)], axis=1)
    split = np.loadtxt(cub_dir / "train_test_split.txt", dtype=int)
    train = split[np.argsort(split[:, 0]), 1] == 1
    locs = np.loadtxt(cub_dir / "parts" / "part_locs.txt")
    locs = locs[np.lexsort((locs[:, 1], locs[:, 0]))].reshape(len(box), 15, 5)
    xy, vis = locs[..., 2:4], locs[..., 4] == 1

    # Centre box of the mean relative size of the training boxes, in each test image.
    bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    rel = np.array([np.mean(bw[train] / wh[train, 0]), np.mean(bh[train] / wh[train, 1])])
    t = ~train
    centre = np.concatenate([wh[t] / 2 - rel * wh[t] / 2, wh[t] / 2 + rel * wh[t] / 2], axis=1)
    tb = box[t]
    iw = np.clip(np.minimum(centre[:, 2], tb[:, 2]) - np.maximum(centre[:, 0], tb[:, 0]), 0, None)
    ih = np.clip(np.minimum(centre[:, 3], tb[:, 3]) - np.maximum(centre[:, 1], tb[:, 1]), 0, None)
    inter = iw * ih
    union = bw[t] * bh[t] + (centre[:, 2] - centre[:, 0]) * (centre[:, 3] - centre[:, 1]) - inter
    hits = int(np.sum(inter / union >= 0.5))

    # Parts at the test box centre, or at their mean box-relative training position.
    size = np.stack([bw, bh], axis=1)
    rel_xy = (xy - box[:, None, :2]) / size[:, None, :]  # (N, 15, 2)
    mean_rel = np.array(
        [rel_xy[train & vis[:, p], p].mean(axis=0) for p in range(15)]
    )  # (15, 2) over training images where the part is visible
    diag = np.hypot(bw[t], bh[t])
    longest = np.maximum(bw[t], bh[t])

    def per_part_mean(values: np.ndarray) -> float:  # mean over parts of the visible mean
        return float(np.mean([values[vis[t][:, p], p].mean() for p in range(15)]))

    middle = (tb[:, :2] + tb[:, 2:]) / 2
    d_middle = np.linalg.norm(xy[t] - middle[:, None, :], axis=-1)
    mean_pos = tb[:, None, :2] + mean_rel[None] * size[t][:, None, :]
    d_mean = np.linalg.norm(xy[t] - mean_pos, axis=-1)
    return {
        "n_test": float(t.sum()),
        "centre_hits": float(hits),
        "err_middle": per_part_mean(d_middle / diag[:, None]),
        "err_mean": per_part_mean(d_mean / diag[:, None]),
        "pck_mean": per_part_mean((d_mean <= 0.1 * longest[:, None]).astype(float)),
    }


@pytest.mark.real_data
def test_cub_baselines(cub_dir):
    """fgloc's reader + metrics against `_cub_baselines_from_text_files` (numpy only).

    The pinned numbers (README: centre box 56.3% CorLoc, i.e. 367 of the 652 test images) are
    what that independent computation gives on the 25-class subset; they are asserted so a
    change of the data is noticed too.
    """
    from fgloc.data.cub import read_cub

    ref = _cub_baselines_from_text_files(cub_dir)
    assert (ref["centre_hits"], ref["n_test"]) == (367, 652)
    assert ref["err_middle"] == pytest.approx(0.25727, abs=1e-5)
    assert ref["err_mean"] == pytest.approx(0.17242, abs=1e-5)
    assert ref["pck_mean"] == pytest.approx(0.19092, abs=1e-5)

    ann = read_cub(cub_dir)
    train, test = ann.split("train"), ann.split("test")
    boxes = test.boxes.astype(np.float64)
    # ground truth against itself is perfect
    assert M.corloc(boxes, boxes) == 1.0
    assert M.pcp(test.parts, test.parts, test.visible)["mean"] == 1.0
    # centre box of the training set's mean relative size (Ebrahimpour & Noelle's baseline)
    centre = M.center_box_baseline(train.boxes, train.image_sizes, test.image_sizes)
    assert M.corloc(centre, boxes) == pytest.approx(ref["centre_hits"] / ref["n_test"])
    # parts: every part at the box centre vs. at its mean box-relative training position
    middle = np.broadcast_to(((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :], test.parts.shape)
    tb = train.boxes.astype(np.float64)
    rel = (train.parts - tb[:, None, :2]) / (tb[:, 2:] - tb[:, :2])[:, None, :]
    vis = train.visible[..., None]
    mean_rel = np.where(vis, rel, 0.0).sum(axis=0) / vis.sum(axis=0)
    mean_pos = boxes[:, None, :2] + mean_rel[None] * (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    _, err_middle = M.normalized_part_error(middle, test.parts, test.visible, boxes)
    _, err_mean = M.normalized_part_error(mean_pos, test.parts, test.visible, boxes)
    assert err_middle == pytest.approx(ref["err_middle"], rel=1e-6)
    assert err_mean == pytest.approx(ref["err_mean"], rel=1e-6)
    _, pck_mean = M.pck(mean_pos, test.parts, test.visible, boxes, alpha=0.1)
    assert pck_mean == pytest.approx(ref["pck_mean"], rel=1e-6)
