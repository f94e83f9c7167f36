"""Smoke test of experiments/toy_scaling.py's pieces, on random data (no scikit-learn needed)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "experiments" / "toy_scaling.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("toy_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upscale_maps_digit_range_to_normalised_32x32(toy):
    images = np.zeros((2, 8, 8))
    images[1] = 16
    x = toy.upscale(images)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full_like(x[0], -1))
    assert torch.allclose(x[1], torch.ones_like(x[1]))


def test_variants_share_initial_weights_and_function_then_train(toy):
    from vitspec.scaling import techniques

    models = {v: toy.make_model(v, seed=0, depth=2) for v in toy.VARIANTS}
    assert techniques(models["baseline"]) == {"attnscale": False, "featscale": None}
    assert techniques(models["attnscale"])["attnscale"] is True
    assert techniques(models["featscale"])["featscale"] == "single"
    base = models["baseline"].state_dict()
    x = torch.randn(4, 3, 32, 32)
    for variant, model in models.items():
        sd = model.state_dict()
        assert all(torch.equal(base[k], sd[k]) for k in base), variant
        extra = set(sd) - set(base)
        assert all(k.endswith(("lamb", "lamb1", "lamb2")) for k in extra), extra
        with torch.no_grad():  # zero scales: the same function as the baseline
            torch.testing.assert_close(
                model.eval()(x), models["baseline"].eval()(x), rtol=1e-4, atol=1e-5
            )

    model = models["attnscale"]
    y = torch.randint(0, 10, (16,))
    losses = toy.train(
        model, torch.randn(16, 3, 32, 32), y, epochs=1, seed=0, batch_size=8, log=lambda m: None
    )
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert 0 <= toy.accuracy(model, torch.randn(6, 3, 32, 32), y[:6]) <= 1
    assert toy.learned_scales(model)["attn_lamb"]["mean_abs"] > 0  # the scales did train
