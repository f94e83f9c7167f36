"""AttnScale and FeatScale (Wang et al., ICLR 2022) added to timm ViTs / DeiTs / CaiTs in place.

Both techniques are learnable rescalings of the high-frequency (HC) part of a signal, with J the
all-1/N matrix over all N tokens (class token included), DC[X] = J X and HC[X] = X - J X:

- **AttnScale**, inside every self-attention, after the softmax (after the talking-heads mix
  ``proj_w`` in CaiT) and before attention dropout: ``A' = J + (1 + w_h) (A - J)``, one scalar
  ``w_h`` per head and layer (``blocks.{i}.attn.lamb``, shape ``[H]``, initialised to 0).
- **FeatScale**, on the attention branch of every block, before the residual add:
  ``y = msa + s * DC[msa] + t * HC[msa]`` with per-channel ``s`` (``blocks.{i}.lamb1``) and ``t``
  (``blocks.{i}.lamb2``), shape ``[C]``, initialised to 0. The authors' released DeiT code adds
  the two terms twice (gains ``1 + 2s`` and ``1 + 2t``): ``doubled=True`` reproduces it; their
  CaiT and Swin code adds them once (``doubled=False``).

Insertion: the attention module's and the block's class is swapped (in place, parameters and
submodules kept) for a subclass in this module whose ``forward`` is timm's explicit attention path
with the scale op added. The op is a parameter-free submodule (``attn.attn_scale``,
``block.feat_scale``) so a forward hook sees the pre-scale attention ``A`` as the input of
``attn.attn_scale`` while ``attn.attn_drop`` still receives ``A'``, the matrix the model uses.
Scaled attention never uses fused SDPA (which cannot apply the scale): ``fused_attn`` is set to
False for good on those modules. Only self-attention blocks (``model.blocks``) are changed; CaiT's
class-attention blocks (``blocks_token_only``) are not.

Example:
    >>> import timm
    >>> m = timm.create_model("deit_tiny_patch16_224", depth=2)
    >>> techniques(add_featscale(add_attnscale(m), doubled=True))
    {'attnscale': True, 'featscale': 'doubled'}
    >>> tuple(m.state_dict()["blocks.0.attn.lamb"].shape), tuple(m.blocks[1].lamb1.shape)
    ((3,), (192,))
"""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models import register_model
from timm.models.cait import Cait, LayerScaleBlock, TalkingHeadAttn
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vitspec.errors import VitspecError

__all__ = [  # register_model appends the registered model names
    "FEATSCALE_FORMS",
    "SCALED_MODELS",
    "AttnScale",
    "FeatScale",
    "add_attnscale",
    "add_featscale",
    "check_featscale_form",
    "default_featscale_form",
    "techniques",
]

FEATSCALE_FORMS = ("doubled", "single")


class AttnScale(nn.Module):
    """``A' = J + (1 + lamb_h) (A - J)``; parameter-free, ``lamb`` lives on the attention module.

    The input ``A`` (``[B, H, N, N]``) is the pre-scale attention: a forward hook on this module
    observes it. Computed as in the released code: ``attn_d = 1/N``, ``attn_h = (A - attn_d) *
    (1 + lamb)``, ``A' = attn_d + attn_h``. Rows of ``A'`` sum to 1 when rows of ``A`` do.
    """

    def forward(self, attn: Tensor, lamb: Tensor) -> Tensor:
        attn_d = 1.0 / attn.shape[-1]
        attn_h = (attn - attn_d) * (1.0 + lamb.to(attn.dtype))[:, None, None]
        return attn_d + attn_h


class FeatScale(nn.Module):
    """``y = x + s * DC[x] + t * HC[x]`` over the token axis (-2); twice the added terms if doubled.

    ``x`` is the attention branch ``[B, N, C]`` (after ``proj`` / ``proj_drop``); ``s`` = ``lamb1``,
    ``t`` = ``lamb2`` live on the block. ``doubled`` reproduces the released DeiT code, which adds
    ``x_d + x_h`` once into ``x_attn`` and again in the residual add (gains ``1 + 2s``, ``1 + 2t``).
    """

    def __init__(self, doubled: bool = False):
        super().__init__()
        self.doubled = bool(doubled)

    def forward(self, x: Tensor, lamb1: Tensor, lamb2: Tensor) -> Tensor:
        x_d = x.mean(dim=-2, keepdim=True)
        x_h = (x - x_d) * lamb2
        x_d = x_d * lamb1
        x = x + x_d + x_h
        if self.doubled:  # the released DeiT code: x + drop_path(x_attn + x_d + x_h)
            x = x + x_d + x_h
        return x

    def extra_repr(self) -> str:
        return f"doubled={self.doubled}"


class AttnScaleAttention(Attention):
    """timm ``Attention`` with AttnScale: the explicit (non-SDPA) path plus ``attn_scale``."""

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        if attn_mask is not None or is_causal:
            raise VitspecError(
                "AttnScale is defined for unmasked self-attention (J averages all "
                "N tokens); attn_mask / is_causal are not supported"
            )
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = attn.softmax(dim=-1)
        attn = self.attn_scale(attn, self.lamb)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class AttnScaleTalkingHeadAttn(TalkingHeadAttn):
    """timm CaiT ``TalkingHeadAttn`` with AttnScale after the post-softmax head mix ``proj_w``."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_scale(attn, self.lamb)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class FeatScaleBlock(Block):
    """timm ViT ``Block`` with FeatScale on the attention branch (before ``ls1``; they commute)."""

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        x_attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.feat_scale(x_attn, self.lamb1, self.lamb2)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class FeatScaleLayerScaleBlock(LayerScaleBlock):
    """timm CaiT ``LayerScaleBlock`` with FeatScale on the attention branch (before ``gamma_1``)."""

    def forward(self, x: Tensor) -> Tensor:
        x_attn = self.feat_scale(self.attn(self.norm1(x)), self.lamb1, self.lamb2)
        x = x + self.drop_path(self.gamma_1 * x_attn)
        x = x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))
        return x


# plain timm class -> scaled subclass (exact types only: a subclass may override forward)
_ATTN = {Attention: AttnScaleAttention, TalkingHeadAttn: AttnScaleTalkingHeadAttn}
_BLOCK = {Block: FeatScaleBlock, LayerScaleBlock: FeatScaleLayerScaleBlock}
_SUPPORTED = (
    "timm VisionTransformer / DeiT (Block with Attention) and CaiT (LayerScaleBlock "
    "with TalkingHeadAttn)"
)


def _blocks(model: nn.Module, what: str) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise VitspecError(
            f"{what} needs model.blocks; supported: {_SUPPORTED}, not {type(model).__name__}"
        )
    return list(blocks)


def _param_like(ref: Tensor, size: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(size, device=ref.device, dtype=ref.dtype))


def add_attnscale(model: nn.Module) -> nn.Module:
    """Add AttnScale to every self-attention block of ``model`` in place; return ``model``.

    Each ``blocks[i].attn`` gets ``lamb`` (zeros ``[num_heads]``, key ``blocks.{i}.attn.lamb``) and
    a parameter-free ``attn_scale`` submodule, and its ``fused_attn`` is set to False for good.
    Blocks that already have AttnScale are left as they are. With all ``lamb`` zero the model
    computes what it computed before (up to float rounding).

    Raises:
        VitspecError: a block's attention is not timm's ``Attention`` / CaiT ``TalkingHeadAttn``.

    Example:
        >>> import timm
        >>> m = add_attnscale(timm.create_model("deit_tiny_patch16_224", depth=2))
        >>> sum(p.numel() for n, p in m.named_parameters() if n.endswith("attn.lamb"))
        6
    """
    for i, block in enumerate(_blocks(model, "add_attnscale")):
        attn = getattr(block, "attn", None)
        if isinstance(attn, (AttnScaleAttention, AttnScaleTalkingHeadAttn)):
            continue
        scaled = _ATTN.get(type(attn))
        if scaled is None:
            raise VitspecError(
                f"add_attnscale: blocks.{i}.attn is {type(attn).__name__}; supported: {_SUPPORTED}"
            )
        attn.__class__ = scaled
        attn.lamb = _param_like(attn.proj.weight, attn.num_heads)
        attn.attn_scale = AttnScale()
        if hasattr(attn, "fused_attn"):
            attn.fused_attn = False  # SDPA never forms A, so it cannot apply the scale
    return model


def add_featscale(model: nn.Module, *, doubled: bool = False) -> nn.Module:
    """Add FeatScale to every self-attention block of ``model`` in place; return ``model``.

    Each ``blocks[i]`` gets ``lamb1`` (``s``) and ``lamb2`` (``t``), zeros ``[C]``, and a
    parameter-free ``feat_scale`` submodule. ``doubled=True`` is the form of the authors'
    released DeiT code (gains ``1 + 2s`` on DC, ``1 + 2t`` on HC); ``doubled=False`` the form of
    their CaiT / Swin code and of the paper (``1 + s``, ``1 + t``). On blocks that already have
    FeatScale only the form is set (their parameters are kept).

    Raises:
        VitspecError: a block is not timm's ViT ``Block`` / CaiT ``LayerScaleBlock``.

    Example:
        >>> import timm
        >>> m = add_featscale(timm.create_model("deit_tiny_patch16_224", depth=2), doubled=True)
        >>> techniques(m)["featscale"], tuple(m.blocks[0].lamb2.shape)
        ('doubled', (192,))
    """
    for i, block in enumerate(_blocks(model, "add_featscale")):
        if isinstance(block, (FeatScaleBlock, FeatScaleLayerScaleBlock)):
            block.feat_scale.doubled = bool(doubled)
            continue
        scaled = _BLOCK.get(type(block))
        if scaled is None:
            raise VitspecError(
                f"add_featscale: blocks.{i} is {type(block).__name__}; supported: {_SUPPORTED}"
            )
        dim = block.norm1.weight.shape[0]
        block.__class__ = scaled
        block.lamb1 = _param_like(block.norm1.weight, dim)
        block.lamb2 = _param_like(block.norm1.weight, dim)
        block.feat_scale = FeatScale(doubled)
    return model


def techniques(model: nn.Module) -> dict:
    """Which techniques ``model`` has: ``{"attnscale": bool, "featscale": form or None}``.

    ``featscale`` is ``"doubled"`` (released DeiT form), ``"single"``, ``"mixed"`` (blocks
    differ) or None.

    Example:
        >>> import timm
        >>> techniques(timm.create_model("deit_tiny_patch16_224", depth=1))
        {'attnscale': False, 'featscale': None}
    """
    attn = any(isinstance(m, AttnScale) for m in model.modules())
    forms = {
        "doubled" if m.doubled else "single" for m in model.modules() if isinstance(m, FeatScale)
    }
    feat = None if not forms else forms.pop() if len(forms) == 1 else "mixed"
    return {"attnscale": attn, "featscale": feat}


def default_featscale_form(model: nn.Module) -> str:
    """The FeatScale form the authors' released code uses for this family.

    ``"single"`` for CaiT (their CaiT code adds the terms once), ``"doubled"`` for DeiT / ViT.
    """
    return "single" if isinstance(model, Cait) else "doubled"


def check_featscale_form(form: str | None) -> str | None:
    """Validate a ``featscale_form`` argument (None = the family's default)."""
    if form is not None and form not in FEATSCALE_FORMS:
        raise VitspecError(
            f"unknown featscale form {form!r}; allowed: {', '.join(FEATSCALE_FORMS)}"
        )
    return form


# ----------------------------------------------------------------------- registered model names

#: registered name -> (timm base model, depth, technique, default FeatScale form)
SCALED_MODELS: dict[str, tuple[str, int, str, str | None]] = {
    **{
        f"{tech}_{size}_{depth}": (
            f"deit_{size}_patch16_224",
            depth,
            tech,
            "doubled" if tech == "featscale" else None,
        )
        for tech in ("attnscale", "featscale")
        for size in ("small", "base")
        for depth in (12, 24)
    },
    "attnscale_cait_xxs24_224": ("cait_xxs24_224", 24, "attnscale", None),
    "featscale_cait_xxs24_224": ("cait_xxs24_224", 24, "featscale", "single"),
}


def _entrypoint(name: str, base: str, depth: int, tech: str, form: str | None) -> Callable:
    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise VitspecError(
                f"{name} has no downloadable weights: create it with "
                "pretrained=False and load a checkpoint (vitspec --ckpt FILE)"
            )
        featscale_form = check_featscale_form(kwargs.pop("featscale_form", None)) or form
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if v is not None or k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
        }
        model = timm.create_model(base, pretrained=False, **{"depth": depth, **kwargs})
        if tech == "attnscale":
            add_attnscale(model)
        else:
            add_featscale(model, doubled=featscale_form == "doubled")
        # keep the base's eval preprocessing, but never point at the base's (unscaled) weights
        cfg = {
            **getattr(model, "pretrained_cfg", {}),
            "architecture": name,
            "tag": None,
            "hf_hub_id": None,
            "url": None,
            "file": None,
        }
        model.pretrained_cfg = model.default_cfg = cfg
        return model

    create.__name__ = create.__qualname__ = name
    create.__doc__ = (
        f"{base} (depth {depth} by default) with {tech}"
        + (f" ({form} form)" if form else "")
        + ", all scales 0; Wang et al. 2022."
    )
    return register_model(create)


for _name, _spec in SCALED_MODELS.items():
    globals()[_name] = _entrypoint(_name, *_spec)
del _name, _spec
