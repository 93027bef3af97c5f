"""Pure, batch-first, jittable map operators.

* `class_activation_maps` — CAM, Zhou et al. 2016 (`cam.py`);
* `sensitivity_maps` — ``|∂S_c/∂x|``, Ebrahimpour & Noelle / Simonyan et al. (`sensitivity.py`);
* `channel_gradient_maps` — per-channel input gradients, Simon et al. 2014
  (`channel_gradients.py`);
* `resize_maps` — ``(..., h, w) -> (..., H, W)`` with `jax.image.resize`;
* `minmax_normalize`, `max_normalize` — per-map scaling to ``[0, 1]`` (`normalize.py`);
* `gaussian_blur` — separable Gaussian smoothing (`smooth.py`).

Maps are ``(B, T, h, w)`` for T classes / channels per image (DEVELOPING.md).
"""

from fgloc.maps.cam import class_activation_maps, resize_maps, top_classes
from fgloc.maps.channel_gradients import argmax_xy, channel_gradient_maps
from fgloc.maps.normalize import max_normalize, minmax_normalize
from fgloc.maps.sensitivity import reduce_rgb, sensitivity_maps
from fgloc.maps.smooth import gaussian_blur

__all__ = [
    "argmax_xy",
    "channel_gradient_maps",
    "class_activation_maps",
    "gaussian_blur",
    "max_normalize",
    "minmax_normalize",
    "reduce_rgb",
    "resize_maps",
    "sensitivity_maps",
    "top_classes",
]
