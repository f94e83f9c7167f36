"""Token-layout helpers shared by the hierarchical, windowed and convolutional-hybrid adapters.

Tap transforms that bring a model's own layout into the sites' layouts (:mod:`vitspec.sites`;
NHWC and windows: ``flatten_nhwc`` and ``split_windows`` in :mod:`vitspec.adapters.base`), and
:func:`shape_probe`, one tiny forward pass that reads per-layer grids and widths where they depend
on convolution arithmetic (stride, padding, pooling).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn


def nchw_tokens(value: Tensor, batch_size: int) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w, C]`` (raster order); a Tap transform.

    Example:
        >>> nchw_tokens(torch.arange(8.0).reshape(1, 2, 2, 2), 1)[0, :, 0]
        tensor([0., 1., 2., 3.])
    """
    return value.flatten(2).transpose(1, 2)


def item(index: int) -> Callable:
    """A Tap transform taking ``value[index]`` of a tuple or list output.

    Example:
        >>> item(1)([torch.ones(1), torch.zeros(1)], 1)
        tensor([0.])
    """
    return lambda value, batch_size: value[index]


def shape_probe(
    model: nn.Module, image_hw: tuple[int, int], taps: dict[object, tuple[nn.Module, str]]
) -> dict[object, tuple[int, ...]]:
    """Shapes seen at ``taps`` (``{key: (module, "input" | "output")}``) in one forward pass of a
    zero image ``[1, 3, *image_hw]``; the first call of each module counts. The model's train/eval
    flags are restored and no gradient is kept (batch-norm statistics do not move: eval mode).
    Hooks already on the model (a running capture's) are suspended for this pass, so it is safe
    to call from inside a run.

    Example:
        >>> conv = nn.Conv2d(3, 4, 3, stride=2)
        >>> seen = []
        >>> _ = conv.register_forward_hook(lambda *a: seen.append(1))
        >>> shape_probe(conv, (9, 9), {"out": (conv, "output")}), seen, len(conv._forward_hooks)
        ({'out': (1, 4, 4, 4)}, [], 1)
    """
    shapes: dict[object, tuple[int, ...]] = {}

    def keep(key):
        def hook(_m, args, output=None):
            if key not in shapes:
                value = output if output is not None else args[0]
                value = value[0] if isinstance(value, (tuple, list)) else value
                shapes[key] = tuple(value.shape)

        return hook

    modes = {m: m.training for m in model.modules()}
    suspended = {m: (m._forward_pre_hooks, m._forward_hooks) for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        for module in suspended:
            module._forward_pre_hooks, module._forward_hooks = OrderedDict(), OrderedDict()
        for key, (module, when) in taps.items():
            if when == "input":
                module.register_forward_pre_hook(keep(key))
            else:
                module.register_forward_hook(keep(key))
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *image_hw, device=device, dtype=dtype))
    finally:
        for module, (pre, post) in suspended.items():  # drops the probe's own hooks too
            module._forward_pre_hooks, module._forward_hooks = pre, post
        for module, training in modes.items():
            module.train(training)
    return shapes
