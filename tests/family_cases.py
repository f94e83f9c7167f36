"""Tiny random-init instances of every family beyond the plain ViT, with what each must show.

The numbers (layers, tokens per layer, pattern shapes) are worked out by hand from each tiny
configuration in the comments: grids from image size, patch size and strides, prefix tokens,
windows and heads. Used by tests/test_families.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch
from torch import nn

from vitspec.sites import PATTERN, RESID_MID

B = 2


def _halonet() -> nn.Module:
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=32, s=1, gs=0, br=0.25),
            ByoBlockCfg(type="self_attn", d=2, c=64, s=2, gs=0, br=0.25),
        ),
        stem_chs=16,
        self_attn_layer="halo",
        self_attn_kwargs=dict(block_size=4, halo_size=1, num_heads=2),
    )
    return ByobNet(cfg)


def _volo() -> nn.Module:
    from timm.models.volo import VOLO  # create_model cannot override volo_d1's layers

    return VOLO(
        img_size=64, layers=(1, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(1, 2, 2, 2)
    )


def _timm(name: str, **kwargs):
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


@dataclass
class Case:
    """One tiny family instance and what it must show (numbers worked out by hand)."""

    build: object
    size: int
    adapter: str
    tokens: list[int]  # N for layers 0..L
    patterns: dict[int, tuple]  # layer -> emitted pattern shape
    missing: dict[str, str] = field(default_factory=dict)  # site -> words of the reason
    recorded: object = None  # emitted pattern -> the softmax's layout; "reshape": same order


def _windows_flat(p):  # [B, nW, H, n, n] -> timm's [B*nW, H, n, n]
    return p.flatten(0, 1)


CASES = {
    # 56 / 4 = 14x14 (4 windows of 7x7; block 2 shifted by 3), merged to 7x7 (one window)
    "swin": Case(
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=56,
            embed_dim=24,
            depths=(2, 2),
            num_heads=(2, 2),
        ),
        56,
        "SwinAdapter",
        [196, 196, 196, 49, 49],
        {1: (B, 4, 2, 49, 49), 2: (B, 4, 2, 49, 49), 3: (B, 1, 2, 49, 49), 4: (B, 1, 2, 49, 49)},
        recorded=_windows_flat,
    ),
    # 64 / 4 = 16x16 (4 windows of 8x8), then 8x8
    "swinv2": Case(
        _timm(
            "swinv2_tiny_window8_256", img_size=64, embed_dim=24, depths=(2, 2), num_heads=(2, 2)
        ),
        64,
        "SwinAdapter",
        [256, 256, 256, 64, 64],
        {1: (B, 4, 2, 64, 64), 2: (B, 4, 2, 64, 64), 3: (B, 1, 2, 64, 64), 4: (B, 1, 2, 64, 64)},
        recorded=_windows_flat,
    ),
    # stem /2: 32x32; stage 1 /2: 16x16, partition 64/32 = 2 (n = 4, 64 windows), heads 16/8;
    # stage 2: 8x8 (16 windows), heads 32/8. Layers: MBConv, block, grid per stage.
    "maxvit": Case(
        _timm(
            "maxvit_tiny_tf_224",
            img_size=64,
            embed_dim=(16, 32),
            depths=(1, 1),
            block_type=("M", "M"),
            stem_width=8,
            transformer_dim_head=8,
        ),
        64,
        "MaxVitAdapter",
        [1024, 256, 256, 256, 64, 64, 64],
        {2: (B, 64, 2, 4, 4), 3: (B, 64, 2, 4, 4), 5: (B, 16, 4, 4, 4), 6: (B, 16, 4, 4, 4)},
        {PATTERN: "MBConv", RESID_MID: "MBConv"},
        recorded=_windows_flat,
    ),
    # 56 / 4 = 14x14 (4 windows), then 7x7; spatial and channel block per stage
    "davit": Case(
        _timm("davit_tiny", embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 2)),
        56,
        "DaVitAdapter",
        [196, 196, 196, 49, 49],
        {1: (B, 4, 2, 49, 49), 3: (B, 1, 2, 49, 49)},
        {PATTERN: "channel attention"},
        recorded=_windows_flat,
    ),
    # 112 / 4 = 28x28: 16 local windows, global keys 28/4 = 7x7; 14x14: 4 windows, 7x7 keys;
    # 7x7: one window, global without reduction (square)
    "twins": Case(
        _timm(
            "twins_svt_small",
            img_size=112,
            embed_dims=(16, 32, 64),
            depths=(2, 2, 2),
            num_heads=(1, 2, 4),
            mlp_ratios=(2, 2, 2),
            sr_ratios=(4, 2, 1),
            wss=(7, 7, 7),
        ),
        112,
        "TwinsAdapter",
        [784, 784, 784, 196, 196, 49, 49],
        {
            1: (B, 16, 1, 49, 49),
            2: (B, 1, 784, 49),
            3: (B, 4, 2, 49, 49),
            4: (B, 2, 196, 49),
            5: (B, 1, 4, 49, 49),
            6: (B, 4, 49, 49),
        },
    ),
    # 224 / 16 = 14x14 (4 windows of 7x7), 7x7 (one), 4x4 (window 4); 4 heads
    "efficientvit_m": Case(
        _timm("efficientvit_m0"),
        224,
        "EfficientVitMAdapter",
        [196, 196, 49, 49, 16, 16, 16],
        {
            1: (B, 4, 4, 49, 49),
            2: (B, 1, 4, 49, 49),
            3: (B, 1, 4, 49, 49),
            4: (B, 1, 4, 16, 16),
            5: (B, 1, 4, 16, 16),
            6: (B, 1, 4, 16, 16),
        },
        recorded=lambda p: [_windows_flat(p)[:, h] for h in range(p.shape[2])],
    ),
    # stem 64/2 = 32, stages /2: 16, 8, 4, 2; LiteMLA in stages 3-4: heads 64/16 and 128/16,
    # doubled by the one aggregation scale
    "efficientvit_mit": Case(
        _timm("efficientvit_b0"),
        64,
        "EfficientVitMitAdapter",
        [1024, 256, 256, 64, 64, 16, 16, 16, 4, 4, 4],
        {6: (B, 8, 16, 16), 7: (B, 8, 16, 16), 9: (B, 16, 4, 4), 10: (B, 16, 4, 4)},
        {PATTERN: "MBConv", RESID_MID: "MBConv"},
    ),
    # (64 - 16) / 8 + 1 = 7x7 (+1 class), pooled to 4x4, 2x2
    "pit": Case(
        _timm("pit_ti_224", img_size=64),
        64,
        "PiTAdapter",
        [50, 50, 50] + [17] * 6 + [5] * 4,
        {
            **{n: (B, 2, 50, 50) for n in (1, 2)},
            **{n: (B, 4, 17, 17) for n in range(3, 9)},
            **{n: (B, 8, 5, 5) for n in range(9, 13)},
        },
    ),
    # 128 / 16 = 8x8, subsampled to 4x4 and 2x2 (queries on the strided grid)
    "levit": Case(
        _timm("levit_128s", img_size=128),
        128,
        "LevitAdapter",
        [64, 64, 64, 16, 16, 16, 16, 4, 4, 4, 4, 4],
        {
            1: (B, 4, 64, 64),
            2: (B, 4, 64, 64),
            3: (B, 8, 16, 64),
            4: (B, 6, 16, 16),
            5: (B, 6, 16, 16),
            6: (B, 6, 16, 16),
            7: (B, 16, 4, 16),
            **{n: (B, 8, 4, 4) for n in range(8, 12)},
        },
    ),
    # 64 / 4 = 16x16, 8x8, 4x4, 2x2; keys reduced by 8, 4, 2 to 2x2, last stage square
    "pvt_v2": Case(
        _timm("pvt_v2_b0", depths=(1, 1, 1, 1)),
        64,
        "PvtV2Adapter",
        [256, 256, 64, 16, 4],
        {1: (B, 1, 256, 4), 2: (B, 2, 64, 4), 3: (B, 5, 16, 4), 4: (B, 8, 4, 4)},
    ),
    # stem /4: 16x16; bottleneck; halo stage /2: 8x8, 4 blocks of 4x4 queries over 6x6 keys
    "halonet": Case(
        _halonet,
        64,
        "HaloNetAdapter",
        [256, 256, 64, 64],
        {2: (B, 2, 64, 36), 3: (B, 2, 64, 36)},
        {PATTERN: "bottleneck", RESID_MID: "bottleneck branch"},
        recorded="reshape",  # timm's [B*H, blocks, queries per block, 6x6], in the same order
    ),
    # branch 1: 120 / 12 = 10x10 + 1; branch 2: 120*224/240 = 112 / 16 = 7x7 + 1; then fusions
    "crossvit": Case(
        _timm(
            "crossvit_tiny_240",
            img_size=120,
            depth=((1, 2, 0),),
            embed_dim=(24, 48),
            num_heads=(2, 2),
            mlp_ratio=(2, 2, 1),
        ),
        120,
        "CrossVitAdapter",
        [101, 101, 50, 50, 101, 50],
        {
            1: (B, 2, 101, 101),
            2: (B, 2, 50, 50),
            3: (B, 2, 50, 50),
            4: (B, 2, 1, 50),
            5: (B, 2, 1, 101),
        },
        {RESID_MID: "only the class token"},
    ),
    # patch 8: 8x8 outlook (16 windows at stride 2), downsampled 4x4 transformers, class blocks
    "volo": Case(
        _volo,
        64,
        "VoloAdapter",
        [64, 64, 16, 16, 16, 17, 17],
        {
            1: (B, 16, 1, 9, 9),
            2: (B, 2, 16, 16),
            3: (B, 2, 16, 16),
            4: (B, 2, 16, 16),
            5: (B, 2, 1, 17),
            6: (B, 2, 1, 17),
        },
        {RESID_MID: "class token"},
        recorded=lambda p: p.transpose(1, 2) if p.dim() == 5 else p,
    ),
    # 64 / 16 = 4x4 patches (+1 class) of 4x4 pixels; inner and outer layer per block
    "tnt": Case(
        _timm(
            "tnt_s_patch16_224",
            img_size=64,
            depth=2,
            embed_dim=48,
            inner_dim=12,
            num_heads_outer=2,
            num_heads_inner=1,
        ),
        64,
        "TntAdapter",
        [17] * 5,
        {1: (B, 16, 1, 16, 16), 2: (B, 2, 17, 17), 3: (B, 16, 1, 16, 16), 4: (B, 2, 17, 17)},
        {RESID_MID: "pixel tokens"},
        recorded=lambda p: _windows_flat(p) if p.dim() == 5 else p,
    ),
    # 128 / 16 = 8x8 (identity mixers), 4x4, 2x2 (single head)
    "shvit": Case(
        _timm("shvit_s1"),
        128,
        "SHViTAdapter",
        [64] * 3 + [16] * 4 + [4] * 5,
        {**{n: (B, 1, 16, 16) for n in range(3, 7)}, **{n: (B, 1, 4, 4) for n in range(7, 12)}},
        {PATTERN: "identity"},
        recorded=lambda p: p[:, 0],
    ),
    # 64 / 16 = 4x4, two XCA blocks, two class-attention blocks (+1 class token)
    "xcit": Case(
        _timm("xcit_nano_12_p16_224", depth=2, img_size=64),
        64,
        "XcitAdapter",
        [16, 16, 16, 17, 17],
        {3: (B, 4, 1, 17), 4: (B, 4, 1, 17)},
        {PATTERN: "channels"},
    ),
}


POSITIONAL = ("attention_biases", "relative_position_bias_table", "rel_pos", "pos_embed")


def built(case: Case) -> nn.Module:
    """The tiny model in eval mode, its positional biases (zero at timm's init in LeViT and
    EfficientViT-M) set to noise so that a recomputation leaving them out cannot pass."""
    model = case.build().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(word in name for word in POSITIONAL):
                param.normal_(0.0, 1.0)
    return model
