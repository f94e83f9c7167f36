"""Every row vitspec writes for a DeiT equals an independent float64 implementation of the contract.

The reference (tests/reference.py) runs its own numpy forward pass from the state dict, forms the
attention from q and k itself, and computes each metric from its definition in shared/metrics.md.
"""

import numpy as np
import pytest
import timm
import torch
from metric_reference import ATTN, TOKEN
from reference import vit_forward

from vitspec import analyze
from vitspec.inputs import eval_transform, iter_batches, open_images

RTOL = 2e-3


def _summary(values: list) -> tuple[np.ndarray, np.ndarray, int]:
    v = np.asarray(values, dtype=np.float64)
    std = v.std(axis=0, ddof=1) if len(v) > 1 else np.full(v.shape[1:], np.nan)
    return v.mean(axis=0), std, len(v)


def _close(actual: float, expected: float, scale: float) -> bool:
    return abs(actual - expected) <= RTOL * abs(expected) + 1e-7 * scale


@pytest.fixture(scope="module", params=["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def run(request):
    kwargs = dict(img_size=48, patch_size=8, depth=3, embed_dim=48, num_heads=3)
    torch.manual_seed(3)
    model = timm.create_model(request.param, pretrained=False, **kwargs).eval()
    result = analyze(
        model, num_images=5, batch_size=2, sites=("embed", "mid", "block"), device="cpu"
    )
    sd = {k: v.double().numpy() for k, v in model.state_dict().items()}
    images = open_images(None, 5)
    batches = list(iter_batches(images, eval_transform(model), 2))
    pixels = torch.cat(batches).double().numpy()
    return result, sd, pixels, model.num_prefix_tokens, kwargs


def _reference(sd, pixels, num_prefix, kwargs):
    """(site, layer, head, name) -> per-image values, from the numpy forward and definitions."""
    grid = (kwargs["img_size"] // kwargs["patch_size"],) * 2
    values = {}
    for image in pixels:
        sites, attention = vit_forward(
            sd, image, patch=kwargs["patch_size"], heads=kwargs["num_heads"], num_prefix=num_prefix
        )
        for (site, layer), x in sites.items():
            for name, fn in TOKEN.items():
                values.setdefault((site, layer, None, name), []).append(fn(x, num_prefix, grid))
        for layer, a in attention.items():
            for name, fn in ATTN.items():
                if name == "attn_cross_layer_sim" and layer == 1:
                    continue
                heads = [
                    fn(a[h], attention[layer - 1][h] if layer > 1 else None)
                    for h in range(a.shape[0])
                ]
                for h, value in enumerate(heads):
                    values.setdefault(("attn", layer, h, name), []).append(value)
                values.setdefault(("attn", layer, -1, name), []).append(np.mean(heads, axis=0))
    curves = {"dlogamp", "token_spectrum", "attn_spectrum"}
    metrics = {k: v for k, v in values.items() if k[3] not in curves}
    return metrics, {k: v for k, v in values.items() if k[3] in curves}


def test_every_metric_row_matches_the_reference(run):
    result, sd, pixels, num_prefix, kwargs = run
    expected, _ = _reference(sd, pixels, num_prefix, kwargs)
    table = result.metrics
    assert len(table) == len(expected)
    bad = []
    for row in table.itertuples():
        head = None if str(row.head) == "<NA>" else int(row.head)
        mean, std, n = _summary(expected[(row.site, row.layer, head, row.metric)])
        assert row.n == n == 5
        scale = max(abs(mean), 1.0)
        if not (_close(row.mean, mean, scale) and _close(row.std, std, scale)):
            bad.append((row.site, row.layer, head, row.metric, row.mean, mean, row.std, std))
    assert not bad, bad[:10]
    assert set(table["depth"]) == {layer / kwargs["depth"] for layer in range(kwargs["depth"] + 1)}


def test_every_spectra_row_matches_the_reference(run):
    result, sd, pixels, num_prefix, kwargs = run
    _, expected = _reference(sd, pixels, num_prefix, kwargs)
    spectra = result.spectra
    assert len(spectra) == sum(len(v[0]) for v in expected.values())
    bad = []
    for (site, layer, head, curve), values in expected.items():
        mean, std, n = _summary(values)
        rows = spectra[
            (spectra["site"] == site) & (spectra["layer"] == layer) & (spectra["curve"] == curve)
        ]
        rows = rows[rows["head"].isna()] if head is None else rows[rows["head"] == head]
        rows = rows.sort_values("freq")
        assert rows["freq"].tolist() == list(range(len(mean)))
        scale = max(np.abs(mean).max(), 1e-3)
        for got_m, got_s, m, s in zip(rows["mean"], rows["std"], mean, std):
            if not (_close(got_m, m, scale) and _close(got_s, s, scale)):
                bad.append((site, layer, head, curve, got_m, m, got_s, s))
    assert not bad, bad[:10]
