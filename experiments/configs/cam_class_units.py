"""Named configurations of ``experiments/cam_class_units.py`` (paper 3, Sec. 5, Fig. 13).

``python -m experiments.cam_class_units --config experiments/configs/cam_class_units.py:<preset>
--workdir W``. Presets: ``default`` (300 CUB test images at 224, the 3 most predicted ImageNet
classes, 3 units each), ``smoke`` (8 images at 96 px, the tests).
"""

from __future__ import annotations

import ml_collections

PRESETS = ("default", "smoke")


def get_config(name: str | None = None) -> ml_collections.ConfigDict:
    name = name or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.backbone = "efficientnet_lite0"
    c.input_size = 224
    c.classes = ()  # ImageNet class ids; empty: the most predicted ones
    c.num_classes = 3
    c.num_units = 3
    c.num_images = 5
    c.segment_threshold = 0.5
    c.max_images = 300
    c.batch_size = 20
    if name == "smoke":
        c.input_size = 96
        c.max_images = 8
        c.batch_size = 8
        c.num_classes = 1
        c.num_units = 2
        c.num_images = 2
    return c
