"""verify beyond the plain ViT: windowed attention per window, stages with other token sets."""

from __future__ import annotations

import timm
import torch

import vitspec

PER_HEAD = ["dc_passthrough", "hc_contraction", "logit_bound", "lowpass_limit", "row_stochastic"]


def _verify(model, size):
    x = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))]
    return vitspec.verify(model, images=x, device="cpu", max_steps=64, warn=lambda m: None)


def test_swin_checks_every_window_and_says_why_branch_checks_do_not_apply():
    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
    ).eval()
    r = _verify(model, 56)
    t = r.table
    assert r.passed
    for check in PER_HEAD:
        rows = t[t["check"] == check]
        assert set(rows["status"]) == {"pass"}
        # heads 2 then 4 per stage; 2 images x 4 windows (stage 1) or 1 window (stage 2)
        assert rows.groupby("layer")["head"].nunique().tolist() == [2, 2, 4, 4]
    cases = t[(t["check"] == "row_stochastic") & (t["head"] == 0)].set_index("layer")["cases"]
    assert cases.tolist() == [2 * 4, 2 * 4, 2, 2]  # one case per window matrix
    branch = t[t["check"].str.startswith("msa_") | (t["check"] == "product_lowpass")]
    assert set(branch["status"]) == {"not-applicable"}
    assert branch["reason"].str.contains("windowed attention").all()
    assert len(branch[branch["check"] == "product_lowpass"]) == 2 * 3 + 2 * 5


def test_pit_products_stop_where_the_token_set_changes():
    torch.manual_seed(0)
    model = timm.create_model(
        "pit_ti_224", pretrained=False, img_size=64, depth=(1, 1), heads=(2, 4)
    ).eval()
    r = _verify(model, 64)
    t = r.table
    assert set(t.loc[t["check"].isin(PER_HEAD), "status"]) == {"pass"}
    prod = t[t["check"] == "product_lowpass"]
    assert set(prod.loc[prod["layer"] == 1, "status"]) == {"pass"}
    later = prod[prod["layer"] == 2]
    assert set(later["status"]) == {"not-applicable"}
    assert later["reason"].str.contains("does not continue the previous layers' token set").all()
