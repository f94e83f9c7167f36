"""The run engine: one loop for several consumers, mergeable state, scheduling by sites."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import vitspec
from vitspec.adapters import _BY_CLASS, register
from vitspec.adapters.vit import ViTAdapter
from vitspec.collect import Collector
from vitspec.engine import Inputs, open_session, run
from vitspec.errors import VitspecError
from vitspec.metrics import list_metrics
from vitspec.sites import PATTERN
from vitspec.verification.model import ModelVerifier
from vitspec.verification.result import table

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def tiny():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()


def images(n, seed):
    return [torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))]


def consumers():
    specs = [s for s in list_metrics() if s.default]
    tokens = Collector([s for s in specs if s.kind.startswith("token")], ("embed", "block"))
    attn = Collector([s for s in specs if s.kind.startswith("attn")])
    return tokens, attn


def run_on(model, batches, *extra, pipeline=True):
    session = open_session(model, inputs=Inputs(batches), device="cpu", warn=lambda m: None)
    made = [*consumers(), *(e(session) for e in extra)]
    run(session, made, pipeline=pipeline, warn=lambda m: None)
    return made


def test_merged_shards_equal_one_run_over_all_images():
    model = tiny()
    a, b = images(3, 1), images(2, 2)
    whole = run_on(model, [torch.cat([a[0], b[0]])])
    first, second = run_on(model, a), run_on(model, b)
    for mine, theirs, want in zip(first, second, whole):
        mine.merge_state(theirs.state())
        assert mine.moments.keys() == want.moments.keys()
        for key, acc in want.moments.items():
            mean, std, n = acc.compute()
            got = mine.moments[key].compute()
            assert got[2] == n == 5
            torch.testing.assert_close(got[0], mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[1], std, rtol=1e-8, atol=1e-12)


def test_analyze_and_verify_consumers_share_one_forward_loop():
    model = tiny()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    batches = images(2, 3)

    def verifier(session):
        return ModelVerifier(session.adapter, session.device, max_steps=64)

    tokens, attn, checker = run_on(model, batches, verifier)
    assert calls == [2]  # one forward pass fed all three consumers
    alone = run_on(model, batches)
    for together, single in zip((tokens, attn), alone):
        for key, acc in single.moments.items():
            torch.testing.assert_close(together.moments[key].compute()[0], acc.compute()[0])
    separate = vitspec.verify(model, images=batches, device="cpu", max_steps=64)
    mine = table(checker.tallies, {"run": "", "model": "", "checkpoint": ""}, {})
    cols = ["check", "layer", "head", "cases", "violations", "max_slack"]
    theirs = separate.table[separate.table["status"] != "not-applicable"][cols]
    assert mine[cols].reset_index(drop=True).equals(theirs.reset_index(drop=True))


class NoPatternViT(VisionTransformer):
    """A ViT whose adapter (below) states that it has no attention pattern."""


class NoPatternAdapter(ViTAdapter):
    family = "no-pattern"

    def taps(self):
        return {k: t for k, t in super().taps().items() if k[0] != PATTERN}

    def unavailable(self):
        return {PATTERN: "this toy family attends over channels"}


@pytest.fixture
def no_pattern_family():
    register(NoPatternViT)(NoPatternAdapter)
    yield
    _BY_CLASS.pop(f"{__name__}.NoPatternViT")


def test_a_metric_whose_site_the_model_lacks_is_not_scheduled(no_pattern_family):
    torch.manual_seed(0)
    model = NoPatternViT(**{**TINY, "patch_size": 8}).eval()
    warnings = []
    r = vitspec.analyze(model, images=images(2, 4), device="cpu", warn=warnings.append)
    assert set(r.metrics["site"]) == {"embed", "block"}
    attn_names = [s.name for s in list_metrics(kind="attn") + list_metrics(kind="attn_curve")]
    assert {r.info["unavailable"][n] for n in attn_names} == {
        "this toy family attends over channels"
    }
    assert "attn_entropy" not in r.info["metrics"]
    assert sum("attends over channels" in w for w in warnings) == 1  # one line per reason


def test_session_errors_before_any_work():
    with pytest.raises(VitspecError, match="batch_size must be"):
        open_session(tiny(), inputs=Inputs(images(1, 0), batch_size=0), device="cpu")
    with pytest.raises(VitspecError, match="allowed: auto, cpu, cuda"):
        open_session(tiny(), device="tpu")
