"""fgloc: finding objects and object parts with pretrained CNNs, in JAX/Flax.

Public entry points::

    import fgloc
    p = fgloc.pretrained("efficientnet_lite0")   # model, variables, preprocess, class_names
    from fgloc.maps import class_activation_maps, sensitivity_maps, channel_gradient_maps
    from fgloc.localize.boxes import boxes_from_maps
"""

from fgloc.pretrained import Pretrained, pretrained

__all__ = ["Pretrained", "pretrained"]
__version__ = "0.1.0"
