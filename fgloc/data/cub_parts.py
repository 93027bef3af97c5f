"""CUB-200-2011's 15 part names and the head / body groups of PCP: one definition, used by the
CUB reader, the metrics and the keypoint code (a constant of the dataset, below everything that
uses it)."""

from __future__ import annotations

__all__ = ["CUB_PART_GROUPS", "CUB_PART_NAMES"]

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

#: Head and body part groups for PCP, as 0-based indices into :data:`CUB_PART_NAMES`.
#: Zhang et al. 2016 (Sec. 3.6, Table 3) crop "head and body ... using the keypoints" after
#: Zhang et al. 2014 (Part-based R-CNN) without listing the keypoints; our choice: the head is
#: beak, crown, forehead, both eyes, nape and throat; the body is back, belly, breast, both wings
#: and tail. Legs are left out of the body (they often hang far below it on a perch).
CUB_PART_GROUPS: dict[str, tuple[int, ...]] = {
    "head": (1, 4, 5, 6, 9, 10, 14),
    "body": (0, 2, 3, 8, 12, 13),
}
