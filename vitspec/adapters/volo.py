"""timm ``VOLO``: outlook attention, then self-attention stages, then class-attention blocks.

Layers, in order: the ``Outlooker`` blocks, the ``Transformer`` blocks of the later stages (the
patch downsampling between them is not a layer) and, numbered after the trunk, the class-attention
blocks (``post_network``, stage ``"class attention"``, prefix 1: only the class token changes).
Tokens: the NHWC maps flattened in raster order, no prefix in the trunk.

Outlook attention, on its own terms: at every output position of the stride-2 grid, a k^2 x k^2
softmax (k = 3) generated from the centre token mixes the k x k neighbourhood's values (tokens in
raster order inside the window, zero padding at the border); each neighbourhood is a window,
``[B, L, H, k^2, k^2]``, every attention metric is computed per window and averaged over the L
windows of the image. Windows overlap (stride 2 < k = 3), unlike Swin's. Transformer stages: A is
the ``attn_drop`` input, square, global. Class attention: the class token's row
``[B, H, 1, 1 + N]``: ``attn_entropy`` only.
"""

from __future__ import annotations

from timm.models.volo import VOLO, ClassBlock, Outlooker, Transformer
from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import FamilyInfo, Tap, flatten_nhwc, pair
from vitspec.adapters.layered import Layer, LayeredAdapter
from vitspec.errors import VitspecError

CLASS_ONLY = "class-attention blocks update only the class token (no full-sequence residual)"


def outlook_windows(value: Tensor, batch_size: int) -> Tensor:
    """Outlook attention ``[B, H, L, k^2, k^2]`` -> windows ``[B, L, H, k^2, k^2]``."""
    return value.transpose(1, 2)


@register(VOLO)
class VoloAdapter(LayeredAdapter):
    """VOLO outlooker and transformer blocks, then class-attention blocks."""

    family = "volo"
    info = FamilyInfo(
        name="VOLO (outlook attention)",
        examples=("volo_d1_224",),
        measured="token metrics at every block; outlook attention per k x k window "
        "(overlapping, stride 2), averaged per image; self-attention in the transformer "
        "stages; attn_entropy of the class token in the class-attention blocks",
        not_measured="attention metrics other than attn_entropy in class-attention blocks; "
        "mid in class-attention blocks",
    )

    def build(self) -> list[Layer]:
        stages = [s for s in self.model.network if isinstance(s, nn.Sequential)]  # not Downsample
        out, last = [], None
        for i, stage in enumerate(stages):
            for block in stage:
                out.append(_trunk_layer(block, f"stage {i + 1}"))
                last = block
        for block in self.model.post_network or []:
            if not isinstance(block, ClassBlock):
                continue
            out.append(
                Layer(
                    stage="class attention",
                    post=Tap(block, "output"),
                    grid_from=(last, "output", "nhwc"),
                    pre=Tap(block, "input"),
                    pattern=Tap(block.attn.attn_drop, "input"),
                    prefix=1,
                    no_mid=CLASS_ONLY,
                )
            )
        return out


def _trunk_layer(block: nn.Module, stage: str) -> Layer:
    block_in = Tap(block, "input", flatten_nhwc)
    common = dict(
        stage=stage,
        post=Tap(block, "output", flatten_nhwc),
        layout="nhwc",
        pre=block_in,
        mid=Tap(block.drop_path1, "output", flatten_nhwc, plus=block_in),
        attn_in=Tap(block.norm1, "output", flatten_nhwc),
        attn_out=Tap(block.drop_path1, "output", flatten_nhwc),
    )
    if isinstance(block, Outlooker):
        attn = block.attn
        return Layer(
            **common,
            pattern=Tap(attn.attn_drop, "input", outlook_windows),
            window=pair(attn.kernel_size),
            partition=f"outlook, stride {attn.stride}",
        )
    if not isinstance(block, Transformer):
        raise VitspecError(f"VOLO block {type(block).__name__} is not an Outlooker or Transformer")
    return Layer(**common, pattern=Tap(block.attn.attn_drop, "input"))
