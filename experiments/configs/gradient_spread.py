"""Named configurations of ``experiments/gradient_spread.py`` (issue 7: why gradient maps spread).

``python -m experiments.gradient_spread --config experiments/configs/gradient_spread.py:<preset>
--workdir W``. Presets: ``default`` (the README table: AlexNet pool5 and Lite0 stages 4–6 at
224, stage 6 at 320) and ``smoke`` (the tests).
"""

from __future__ import annotations

import ml_collections

PRESETS = ("default", "smoke")


def candidate(backbone: str, layer: str, input_size: int) -> ml_collections.ConfigDict:
    """A network layer whose channels' gradient maps are measured, on ``input_size²`` box crops."""
    return ml_collections.ConfigDict(
        {"backbone": backbone, "layer": layer, "input_size": input_size}
    )


def get_config(name: str | None = None) -> ml_collections.ConfigDict:
    name = name or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    # Candidates by name (the name keys their metrics).
    c.candidates = ml_collections.ConfigDict(
        {
            "alexnet_pool5_227": candidate("alexnet_lpips", "pool5", 227),
            "lite0_stage4_224": candidate("efficientnet_lite0", "stage4", 224),
            "lite0_stage5_224": candidate("efficientnet_lite0", "stage5", 224),
            "lite0_stage6_224": candidate("efficientnet_lite0", "stage6", 224),
            "lite0_stage6_320": candidate("efficientnet_lite0", "stage6", 320),
        }
    )
    c.n_map_images = 4  # test images whose every channel's gradient map is measured
    c.n_gate_images = 16  # test images for the gate statistics (forward pass)
    c.chunk_size = 32
    if name == "smoke":
        c.candidates = ml_collections.ConfigDict(
            {
                "alexnet_pool5_67": candidate("alexnet_lpips", "pool5", 67),
                "lite0_stage6_64": candidate("efficientnet_lite0", "stage6", 64),
            }
        )
        c.n_map_images = 1
        c.n_gate_images = 2
        c.chunk_size = 256  # one chunk: least compile time
    return c
