"""Hugging Face transformers ViT, DeiT and DINOv2 models (optional extra ``vitspec[hf]``).

Registered by class name, so nothing imports ``transformers`` unless such a model is given. The
encoder layers are ``<base>.layers`` (transformers 5); each layer's ``attention`` returns
``(branch, attention weights)``, the weights being the softmax only with eager attention, which
:meth:`HFViTAdapter.prepare` switches on (``set_attn_implementation``) and restores. Tokens are
the class token (DeiT: and the distillation token) then the patch grid in raster order, as in
timm, so the same weights and inputs give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from vitspec.adapters import register
from vitspec.adapters.base import Adapter, AttentionWeights, FamilyInfo, Geometry, Tap, pair
from vitspec.errors import VitspecError
from vitspec.sites import (
    ATTN_IN,
    ATTN_OUT,
    PATTERN,
    PATTERN_SITES,
    RESID_MID,
    RESID_POST,
    RESID_PRE,
)

_M = "transformers.models."
CLASSES = (
    f"{_M}vit.modeling_vit.ViTModel",
    f"{_M}vit.modeling_vit.ViTForImageClassification",
    f"{_M}deit.modeling_deit.DeiTModel",
    f"{_M}deit.modeling_deit.DeiTForImageClassification",
    f"{_M}deit.modeling_deit.DeiTForImageClassificationWithTeacher",
    f"{_M}dinov2.modeling_dinov2.Dinov2Model",
    f"{_M}dinov2.modeling_dinov2.Dinov2ForImageClassification",
)
BASES = ("vit", "deit", "dinov2")  # attribute of the base model in the *For... classes


def _branch(output, batch_size: int) -> Tensor:
    return output[0]


def _weights(output, batch_size: int) -> Tensor:
    if output[1] is None:
        raise VitspecError("the transformers attention returned no weights: eager attention is off")
    return output[1]


@register(*CLASSES)
class HFViTAdapter(Adapter):
    """``<base>.layers[i]`` with ``attention`` (q/k/v/o projections) and an optional
    ``layer_scale1`` (DINOv2)."""

    family = "hf-vit"
    info = FamilyInfo(
        name="Hugging Face ViT / DeiT / DINOv2",
        examples=("ViTModel", "ViTForImageClassification", "DeiTModel", "Dinov2Model"),
        measured="every metric at every site (eager attention); `vitspec analyze hf:FOLDER` "
        "reads a local model folder and its image processor config",
    )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = next((getattr(model, b) for b in BASES if hasattr(model, b)), model)
        self.layers = list(base.layers)
        config = model.config
        self.num_prefix = 2 if type(base).__name__.startswith("DeiT") else 1
        self.patch_size = pair(config.patch_size)
        self.channels = int(config.hidden_size)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def taps(self) -> dict[tuple[str, int], Tap]:
        out = {}
        for n, layer in enumerate(self.layers, start=1):
            attn = layer.attention
            scale = getattr(layer, "layer_scale1", None)
            branch = Tap(scale, "output") if scale is not None else Tap(attn, "output", _branch)
            out[(RESID_PRE, n)] = Tap(layer, "input")
            out[(RESID_POST, n)] = Tap(layer, "output")
            out[(ATTN_IN, n)] = Tap(attn, "input")
            out[(ATTN_OUT, n)] = branch
            out[(RESID_MID, n)] = Tap(
                branch.module, "output", branch.transform, Tap(layer, "input")
            )
            out[(PATTERN, n)] = Tap(attn, "output", _weights)
        return out

    def geometry(self, image_hw: tuple[int, int]) -> list[Geometry]:
        grid = (image_hw[0] // self.patch_size[0], image_hw[1] // self.patch_size[1])
        return [Geometry(self.num_prefix, grid, self.channels)] * (self.depth + 1)

    @contextmanager
    def prepare(self, sites: frozenset[str]) -> Iterator[None]:
        before = self.model.config._attn_implementation
        switch = bool(sites & set(PATTERN_SITES)) and before != "eager"
        try:
            if switch:
                self.model.set_attn_implementation("eager")
            yield
        finally:
            if switch:
                self.model.set_attn_implementation(before)

    def attention_weights(self, layer: int) -> AttentionWeights | str:
        block = self.layers[layer - 1]
        attn = block.attention
        heads = int(self.model.config.num_attention_heads)
        v, o = attn.v_proj, attn.o_proj
        d = v.out_features // heads
        w_v = v.weight.detach().double().reshape(heads, d, v.in_features).transpose(1, 2)
        b_v = None if v.bias is None else v.bias.detach().double().reshape(heads, d)
        w_o = o.weight.detach().double().T.reshape(heads, d, -1)
        b_o = None if o.bias is None else o.bias.detach().double()
        scale = getattr(block, "layer_scale1", None)
        if scale is not None:
            g = scale.lambda1.detach().double()
            w_o, b_o = w_o * g, None if b_o is None else b_o * g
        return AttentionWeights(w_v, b_v, w_o, b_o)
