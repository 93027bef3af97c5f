"""Named configurations of ``experiments/choose_cli_defaults.py`` (the CLI's size and threshold).

``python -m experiments.choose_cli_defaults --config
experiments/configs/choose_cli_defaults.py:<preset> --workdir W`` (``--data_dir`` defaults to
``../shared/data``, which holds ``imagenet_val_sample/``). Presets: ``default`` (the README's
CAM sweep: sizes 224/320/448 × thresholds 0.15–0.5), ``smoke`` (4 images, one setting).
"""

from __future__ import annotations

import ml_collections

PRESETS = ("default", "smoke")


def get_config(name: str | None = None) -> ml_collections.ConfigDict:
    name = name or "default"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.model = "efficientnet_lite0"
    c.method = "cam"  # cam | sensitivity
    c.sizes = (224, 320, 448)  # input sizes swept
    c.thresholds = (0.15, 0.2, 0.3, 0.35, 0.4, 0.5)  # box thresholds swept (fraction of max)
    c.smooth = ()  # sensitivity: Gaussian sigmas in pixels at 224 (scaled); () = the CLI's own
    c.max_images = 0  # 0: all
    c.batch_size = 10
    if name == "smoke":
        c.sizes = (64,)
        c.thresholds = (0.35,)
        c.max_images = 4
        c.batch_size = 4
    return c
