"""CUB-200-2011's 15 part names and the head / body groups of PCP: one definition, used by the
CUB reader, the metrics and the keypoint code (a constant of the dataset, below everything that
uses it)."""

from __future__ import annotations

__all__ = [
    "CUB_PART_GROUPS",
    "CUB_PART_GROUPS_TORSO",
    "CUB_PART_NAMES",
    "PCP_DEFINITIONS",
    "PCP_MIN_VISIBLE",
]

#: CUB-200-2011 part names in ``parts/parts.txt`` order (part id ``i + 1`` is index ``i``).
CUB_PART_NAMES: tuple[str, ...] = (
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
)

#: Head and body part groups for PCP, as 0-based indices into :data:`CUB_PART_NAMES`: the
#: definition of Part-based R-CNN (Zhang et al. 2014), whose head and body boxes Zhang et al. 2016
#: (Sec. 3.6, Table 3) predict "using the keypoints" without listing them. Read off the boxes
#: that Part-based R-CNN's code release ships (``annotations/bird_{train,test}.mat``): on the
#: 1,402 images of our 25-class subset, its head box is the tightest box around the visible
#: beak, crown, forehead, eyes, nape and throat, and its body box the tightest box around the
#: visible back, belly, breast, legs, wings, tail and throat, in every image that has one; a box
#: exists only where at least :data:`PCP_MIN_VISIBLE` of the group's keypoints are visible.
#: Checked to the pixel on all 1,401 head and 1,355 body boxes by `scripts/check_pcp_boxes.py`.
CUB_PART_GROUPS: dict[str, tuple[int, ...]] = {
    "head": (1, 4, 5, 6, 9, 10, 14),
    "body": (0, 2, 3, 7, 8, 11, 12, 13, 14),
}

#: Fewest visible keypoints that make a PCP box (Part-based R-CNN's released boxes: none from two).
PCP_MIN_VISIBLE = 3

#: fgloc's own guess before the released boxes were read (its numbers up to 2026-12-03): the body
#: without legs and throat, a box from two visible keypoints. Kept to compare with those numbers;
#: on the subset its body box has a median IoU of 0.73 with Part-based R-CNN's (equal in 58 of
#: 1,354; `scripts/check_pcp_boxes.py`).
CUB_PART_GROUPS_TORSO: dict[str, tuple[int, ...]] = {
    "head": CUB_PART_GROUPS["head"],
    "body": (0, 2, 3, 8, 12, 13),
}

#: The PCP definitions by name: ``(groups, min_visible)``. ``"prcnn"`` is the paper's.
PCP_DEFINITIONS: dict[str, tuple[dict[str, tuple[int, ...]], int]] = {
    "prcnn": (CUB_PART_GROUPS, PCP_MIN_VISIBLE),
    "torso": (CUB_PART_GROUPS_TORSO, 2),
}
