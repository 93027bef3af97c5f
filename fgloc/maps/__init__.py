"""Pure, batch-first, jittable map operators.

* `class_activation_maps` — CAM, Zhou et al. 2016 (`cam.py`);
* `sensitivity_maps` — ``|∂S_c/∂x|``, Ebrahimpour & Noelle / Simonyan et al. (`sensitivity.py`);
* `channel_gradient_maps` — per-channel input gradients, Simon et al. 2014
  (`channel_gradients.py`);
* `resize_maps` — ``(..., h, w) -> (..., H, W)`` with `jax.image.resize`.

Maps are ``(B, T, h, w)`` for T classes / channels per image (DEVELOPING.md).
"""

from fgloc.maps.cam import class_activation_maps, resize_maps, top_classes
from fgloc.maps.channel_gradients import argmax_xy, channel_gradient_maps
from fgloc.maps.sensitivity import reduce_rgb, sensitivity_maps

__all__ = [
    "argmax_xy",
    "channel_gradient_maps",
    "class_activation_maps",
    "reduce_rgb",
    "resize_maps",
    "sensitivity_maps",
    "top_classes",
]
