"""`CubAnnotations.classes` and the class-disjoint protocol constants (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest

from fgloc.data import cub


def test_design_and_score_classes_are_disjoint_and_cover_the_shared_subset():
    assert set(cub.DESIGN_CLASSES).isdisjoint(cub.SCORE_CLASSES)
    assert sorted(cub.DESIGN_CLASSES + cub.SCORE_CLASSES) == list(range(1, 26))


def test_classes_selects_by_one_based_id(cub_dir):
    ann = cub.read_cub(cub_dir)
    design, score = ann.classes(cub.DESIGN_CLASSES), ann.classes(cub.SCORE_CLASSES)
    # counted straight from the text file, not from the reader
    lines = (cub_dir / "image_class_labels.txt").read_text().split()
    ids = np.array(lines[1::2], int)
    assert len(design) == int(np.sum(ids <= 12)) and len(score) == int(np.sum(ids >= 13))
    assert set(np.unique(design.labels + 1)) == set(cub.DESIGN_CLASSES)
    assert set(np.unique(score.labels + 1)) <= set(cub.SCORE_CLASSES)
    with pytest.raises(ValueError, match="class ids must lie in"):
        ann.classes([0])
