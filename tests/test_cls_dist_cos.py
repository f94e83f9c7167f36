"""cls_dist_cos: the cosine between a distilled DeiT's class and distillation tokens.

Checked against an independent float64 numpy forward (tests/reference.py) at every site, and not
scheduled (with the reason in run.json) for a model without a distillation token.
"""

import numpy as np
import pytest
import timm
import torch
from reference import vit_forward

import vitspec.functional as F
from vitspec import analyze
from vitspec.errors import VitspecError
from vitspec.inputs import eval_transform, iter_batches, open_images

KW = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def test_hand_computed_and_refused_without_two_prefix_tokens():
    x = torch.tensor([[[3.0, 4.0], [4.0, 3.0], [1.0, 1.0]], [[1.0, 0.0], [-2.0, 0.0], [0, 1]]])
    assert F.cls_dist_cos(x, 2, (1, 1)).tolist() == pytest.approx([24 / 25, -1.0], rel=1e-15)
    with pytest.raises(VitspecError, match="num_prefix 2"):
        F.cls_dist_cos(x[:, 1:], 1, (1, 1))


def test_distilled_deit_matches_numpy_forward():
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **KW).eval()
    result = analyze(
        model,
        num_images=3,
        batch_size=2,
        sites=("embed", "mid", "block"),
        metrics="cls_dist_cos",
        device="cpu",
        warn=lambda m: None,
    )
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    images = list(iter_batches(open_images(None, 3), eval_transform(model), 3))
    expected: dict[tuple, list[float]] = {}
    for image in torch.cat(images).double().numpy():
        sites, _ = vit_forward(sd, image, patch=8, heads=3, num_prefix=2)
        for (site, layer), x in sites.items():
            cos = x[0] @ x[1] / (np.linalg.norm(x[0]) * np.linalg.norm(x[1]))
            expected.setdefault((site, layer), []).append(cos)
    rows = result.metric("cls_dist_cos")
    assert len(rows) == len(expected) == 1 + 2 + 2
    for row in rows.itertuples():
        want = np.asarray(expected[(row.site, row.layer)])
        assert row.mean == pytest.approx(want.mean(), rel=2e-4, abs=1e-6)
        assert row.std == pytest.approx(want.std(ddof=1), rel=2e-3, abs=1e-6)
    assert result.info["unavailable"] == {}


def test_not_scheduled_for_one_prefix_token():
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **KW).eval()
    warnings = []
    result = analyze(
        model, num_images=2, metrics="cls_dist_cos,hc_energy", device="cpu", warn=warnings.append
    )
    assert "cls_dist_cos" not in set(result.metrics["metric"])
    assert "cls_dist_cos" not in result.info["metrics"]
    why = result.info["unavailable"]["cls_dist_cos"]
    assert "2 prefix tokens" in why and "has 1" in why
    assert warnings == [f"cls_dist_cos not measured: {why}"]
