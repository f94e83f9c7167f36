"""analyze() on tiny random-init models: table shape, refusals, streaming, tensor inputs."""

import json
import math

import pandas as pd
import pytest
import timm
import torch

from vitspec import analyze
from vitspec.errors import VitspecError
from vitspec.inputs import synthetic_batches
from vitspec.metrics import list_metrics
from vitspec.results import Result

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def tiny(name="deit_tiny_patch16_224", seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**TINY, **kw}).eval()


@pytest.fixture(scope="module")
def result():
    return analyze(tiny(), num_images=3, batch_size=2, device="cpu", warn=lambda m: None)


def test_table_has_every_metric_at_every_site_layer_and_head(result):
    m = result.metrics
    token = [s.name for s in list_metrics(kind="token") if "class_and_distillation" not in s.needs]
    attn = [s.name for s in list_metrics(kind="attn")]
    assert set(m.loc[m["site"] == "embed", "metric"]) == set(token)
    assert m[m["site"] == "embed"]["layer"].unique().tolist() == [0]
    assert m[m["site"] == "block"]["layer"].unique().tolist() == [1, 2, 3]
    a = m[m["site"] == "attn"]
    assert set(a["metric"]) == set(attn)
    assert set(a["head"]) == {-1, 0, 1}
    cross = a[a["metric"] == "attn_cross_layer_sim"]
    assert cross["layer"].unique().tolist() == [2, 3]  # defined for l >= 2 only
    assert (m["n"] == 3).all() and (result.spectra["n"] == 3).all()
    assert m["head"].dtype == "Int64"
    n_tokens = 1 + 16
    s = result.spectra
    assert (
        len(s[(s["curve"] == "token_spectrum") & (s["site"] == "block") & (s["layer"] == 1)])
        == n_tokens
    )
    assert (
        len(s[(s["curve"] == "attn_spectrum") & (s["head"] == -1) & (s["layer"] == 1)]) == n_tokens
    )
    assert len(s[(s["curve"] == "dlogamp") & (s["site"] == "embed")]) == 4 - 4 // 2


def test_head_mean_row_is_mean_of_heads_per_image(result):
    m = result.metrics
    e = m[(m["metric"] == "attn_entropy") & (m["layer"] == 2)].set_index("head")["mean"]
    assert e.loc[-1] == pytest.approx((e.loc[0] + e.loc[1]) / 2, rel=1e-12)
    assert 0 < e.loc[-1] <= math.log(17) + 1e-9


def test_results_round_trip_and_are_atomic(result, tmp_path, monkeypatch):
    out = result.save(tmp_path / "run")
    back = Result.load(out)
    pd.testing.assert_frame_equal(back.metrics, result.metrics, check_exact=False, rtol=1e-9)
    assert json.loads((out / "run.json").read_text())["images"]["used"] == 3
    with pytest.raises(VitspecError, match="exists; pass overwrite=True"):
        result.save(out)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vitspec.results.json.dumps", fail)
    with pytest.raises(OSError, match="disk full"):
        result.save(tmp_path / "half")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-written directory


def test_tensor_batches_equal_folder_free_input_and_cut_at_num_images():
    model = tiny()
    batches = list(synthetic_batches(5, 2, (32, 32), seed=1))
    full = analyze(model, images=batches, device="cpu", warn=lambda m: None)
    cut = analyze(
        model, images=[(b, None) for b in batches], num_images=4, device="cpu", warn=lambda m: None
    )
    assert full.info["images"]["used"] == 5 and cut.info["images"]["used"] == 4
    assert (cut.metrics["n"] == 4).all()


def test_streaming_batches_do_not_change_the_result():
    model = tiny()
    batches = list(synthetic_batches(6, 6, (32, 32), seed=2))
    one = analyze(model, images=batches, device="cpu", warn=lambda m: None)
    small = [b for batch in batches for b in batch.split(1)]
    many = analyze(model, images=small, device="cpu", warn=lambda m: None)
    pd.testing.assert_frame_equal(
        one.metrics, many.metrics, check_exact=False, rtol=1e-5, atol=1e-7
    )


def test_non_stochastic_attention_is_refused_but_tokens_still_run():
    model = tiny()
    attn = model.blocks[1].attn
    original = attn.forward

    def doubled(x, *args, **kwargs):  # like talking heads: mixes after the softmax
        hook = attn.attn_drop.register_forward_pre_hook(lambda m, a: (a[0] * 2,), prepend=True)
        try:
            return original(x, *args, **kwargs)
        finally:
            hook.remove()

    attn.forward = doubled
    warnings = []
    r = analyze(
        model, images=list(synthetic_batches(2, 2, (32, 32))), device="cpu", warn=warnings.append
    )
    assert any("block 2: attention metrics skipped" in w for w in warnings)
    a = r.metrics[r.metrics["site"] == "attn"]
    assert 2 not in set(a["layer"])
    assert 3 in set(a[a["metric"] == "attn_entropy"]["layer"])
    assert 3 not in set(a[a["metric"] == "attn_cross_layer_sim"]["layer"])  # no layer-2 partner
    assert set(r.metrics.loc[r.metrics["site"] == "block", "layer"]) == {1, 2, 3}
    assert "2" in r.info["attention_refused"]


def test_nan_activations_name_the_layer():
    model = tiny()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(VitspecError, match=r"output of block 2 \(blocks\.1\)") as err:
        analyze(model, images=list(synthetic_batches(2, 2, (32, 32))), device="cpu")
    assert err.value.exit_code == 1


def test_metric_selection_and_errors():
    r = analyze(
        tiny(),
        images=list(synthetic_batches(2, 2, (32, 32))),
        device="cpu",
        metrics="hc_*,attn_entropy",
        sites=["block"],
    )
    assert set(r.metrics["metric"]) == {"hc_dc_ratio", "hc_energy", "attn_entropy"}
    assert r.spectra.empty
    with pytest.raises(VitspecError, match="allowed: hc_dc_ratio"):
        analyze(tiny(), metrics="nope_*")
    with pytest.raises(VitspecError, match="allowed: embed, mid, block"):
        analyze(tiny(), sites=["blk"])
    with pytest.raises(VitspecError, match="allowed: auto, cpu, cuda"):
        analyze(tiny(), device="tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    model = tiny(depth=4)
    batches = list(synthetic_batches(6, 3, (32, 32), seed=5))
    cpu = analyze(model, images=batches, device="cpu")
    gpu = analyze(model, images=batches, device="cuda")
    pd.testing.assert_frame_equal(cpu.metrics, gpu.metrics, check_exact=False, rtol=1e-3, atol=1e-6)
    pd.testing.assert_frame_equal(cpu.spectra, gpu.spectra, check_exact=False, rtol=1e-3, atol=1e-6)


def test_worker_pipeline_gives_the_inline_result():
    model = tiny(depth=4)
    batches = list(synthetic_batches(5, 2, (32, 32), seed=4))
    inline = analyze(model, images=batches, device="cpu", pipeline=False, warn=lambda m: None)
    worker = analyze(model, images=batches, device="cpu", pipeline=True, warn=lambda m: None)
    # the worker runs its torch ops on 1 thread, inline on 2: reduction order differs slightly
    pd.testing.assert_frame_equal(inline.metrics, worker.metrics, check_exact=False, rtol=1e-7)
    pd.testing.assert_frame_equal(
        inline.spectra, worker.spectra, check_exact=False, rtol=1e-7, atol=1e-12
    )
