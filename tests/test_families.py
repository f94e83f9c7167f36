"""Every attention family beyond the plain ViT, on a tiny random-init instance and two images.

Per family: the adapter and its layer count, token counts per layer (worked out by hand from the
tiny configuration: grids, strides, prefix tokens), the emitted pattern shapes, rows summing to 1,
raster token order against the model's own maps, the patterns against the softmax the model's
code actually computed (recorded by patching the softmax), one hand recomputation where the
layout is easy to get wrong (Swin's shifted windows, MaxViT's dilated grid windows, linear
attention), the stated reasons for what is missing, and an end-to-end ``vitspec.analyze``.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from family_cases import CASES, B, built
from torch import nn

import vitspec
from vitspec.adapters import get_adapter
from vitspec.capture import capture
from vitspec.sites import PATTERN, SITES


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request):
    torch.manual_seed(0)
    case = CASES[request.param]
    return request.param, case, built(case), torch.randn(B, 3, case.size, case.size)


def _observe(adapter, model, x, sites=SITES):
    seen: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad(), capture(adapter, sites, lambda s, n, t: seen.__setitem__((s, n), t)):
        model(x)
    return seen


def _value_heads(linear: nn.Module, tokens: torch.Tensor, heads: int, bias=None) -> torch.Tensor:
    """``[..., n, H, d]``: the value part of a fused ``qkv`` linear (q, k, v blocks of H*d)."""
    w = linear.weight[2 * linear.weight.shape[0] // 3 :]
    b = linear.bias[2 * w.shape[0] :] if bias is None and linear.bias is not None else bias
    v = F.linear(tokens, w, b)
    return v.reshape(*v.shape[:-1], heads, -1)


def _record(module: nn.Module, when: str, store: dict, key):
    if when == "input":
        return module.register_forward_pre_hook(lambda _m, a: store.__setitem__(key, a[0]))
    return module.register_forward_hook(lambda _m, _a, o: store.__setitem__(key, o))


@pytest.fixture
def softmaxes(monkeypatch):
    """Every softmax output computed by timm's code during the test (not vitspec's replays)."""
    out: list[torch.Tensor] = []
    tensor_softmax, functional_softmax = torch.Tensor.softmax, F.softmax

    def from_timm() -> bool:
        return "timm" in sys._getframe(2).f_code.co_filename.replace("\\", "/").split("/")

    def method(self, *args, **kwargs):
        result = tensor_softmax(self, *args, **kwargs)
        if from_timm():
            out.append(result)
        return result

    def function(x, *args, **kwargs):  # nn.Softmax modules call F.softmax
        result = functional_softmax(x, *args, **kwargs)
        if from_timm() or "torch" in sys._getframe(1).f_code.co_filename:
            out.append(result)
        return result

    monkeypatch.setattr(torch.Tensor, "softmax", method)
    monkeypatch.setattr(F, "softmax", function)
    return out


def test_layers_tokens_and_patterns(family, softmaxes):
    """One forward under capture: layer count, token counts and widths per layer, pattern
    shapes, rows summing to 1, tokens in raster order (against the model's own NHWC / NCHW maps,
    indexed by hand), and every pattern equal to a softmax the model's code computed."""
    name, case, model, x = family
    adapter = get_adapter(model)
    assert type(adapter).__name__ == case.adapter
    assert adapter.depth == len(case.tokens) - 1
    geometry = adapter.geometry((case.size, case.size))
    assert [g.tokens for g in geometry] == case.tokens
    raw, handles = {}, []
    for n, layer in enumerate(adapter.layers, start=1):
        if layer.layout in ("nhwc", "nchw"):
            handles.append(_record(layer.post.module, "output", raw, n))
    softmaxes.clear()  # the geometry's probe pass ran the model too
    try:
        seen = _observe(adapter, model, x)
    finally:
        for h in handles:
            h.remove()
    patterns = {n: t for (s, n), t in seen.items() if s == PATTERN}
    assert {n: tuple(t.shape) for n, t in patterns.items()} == case.patterns
    for (site, n), t in seen.items():
        if site != PATTERN and (site != "resid_pre" or n == 1):  # resid_pre: after downsampling
            g = geometry[n if site != "resid_pre" else 0]
            assert t.shape == (B, g.tokens, g.channels), (site, n)
    for n, out in raw.items():
        tokens, (h, w) = seen[("resid_post", n)], geometry[n].grid
        r, c = h - 1, w // 2
        own = out[:, r, c, :] if adapter.layers[n - 1].layout == "nhwc" else out[:, :, r, c]
        torch.testing.assert_close(tokens[:, geometry[n].prefix + r * w + c], own)
    for n, p in sorted(patterns.items()):
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)
        if name == "efficientvit_mit":  # no softmax: test_linear_attention_reproduces_the_module
            continue
        wanted = case.recorded(p) if callable(case.recorded) else p
        for part in wanted if isinstance(wanted, list) else [wanted]:
            found = [
                r.reshape(part.shape) if case.recorded == "reshape" else r
                for r in softmaxes
                if r.numel() == part.numel()
            ]
            assert any(
                r.shape == part.shape and torch.allclose(r, part, atol=1e-6) for r in found
            ), f"layer {n}: no softmax of the model equals the emitted pattern"
    unavailable = adapter.unavailable()
    for site, words in case.missing.items():
        assert words in unavailable[site]


@pytest.mark.parametrize("name", ["swin", "swinv2", "maxvit"])
def test_window_attention_by_hand(name):
    """A of window (i, j) times the values of the tokens gathered by hand from the map (after
    the cyclic shift; MaxViT's grid windows: the dilated positions) gives the attention's
    output before ``proj``: the emitted windows are the model's, in the stated token order."""
    torch.manual_seed(0)
    case = CASES[name]
    model = built(case)
    x = torch.randn(B, 3, case.size, case.size)
    adapter = get_adapter(model)
    if name == "maxvit":  # grid partition of stage 1 (layer 3), channels-last
        part = model.stages[0].blocks[0].attn_grid
        layers = {3: (part.norm1, part.attn, (0, 0), "grid", part.partition_size[0])}
    else:  # unshifted block (layer 1) and shifted block (layer 2) of stage 1
        blocks = model.layers[0].blocks
        layers = {
            n: (
                b.norm1 if name == "swin" else None,
                b.attn,
                b.shift_size,
                "block",
                b.window_size[0],
            )
            for n, b in enumerate(blocks, start=1)
        }
    store, handles = {}, []
    for n, (norm, attn, *_rest) in layers.items():
        block = adapter.layers[n - 1].post.module
        handles.append(
            _record(
                norm if norm is not None else block,
                "output" if norm else "input",
                store,
                ("map", n),
            )
        )
        handles.append(_record(attn.proj, "input", store, ("proj_in", n)))
    try:
        seen = _observe(adapter, model, x, {PATTERN})
    finally:
        for h in handles:
            h.remove()
    for n, (_norm, attn, shift, kind, size) in layers.items():
        grid = store[("map", n)].roll((-shift[0], -shift[1]), dims=(1, 2))
        hh, ww = grid.shape[1:3]
        a, proj_in = seen[(PATTERN, n)], store[("proj_in", n)]
        heads = a.shape[2]
        windows = [(i, j) for i in range(hh // size) for j in range(ww // size)]
        for w, (i, j) in enumerate(windows):
            if kind == "grid":  # tokens (r * hh/size + i, c * ww/size + j) for r, c < size
                tok = grid[:, i :: hh // size, j :: ww // size]
            else:
                tok = grid[:, i * size : (i + 1) * size, j * size : (j + 1) * size]
            tok = tok.reshape(B, size * size, -1)
            bias = attn.v_bias if name == "swinv2" else None  # v2: q, k, v biases apart
            v = _value_heads(attn.qkv, tok, heads, bias=bias)
            mixed = torch.einsum("bhnm,bmhd->bnhd", a[:, w], v).flatten(2)
            torch.testing.assert_close(
                mixed,
                proj_in.reshape(B, len(windows), size * size, -1)[:, w],
                atol=1e-5,
                rtol=1e-4,
            )


def test_linear_attention_reproduces_the_module():
    """EfficientViT-MIT: A V (values from the module's own qkv and aggregation, recomputed here)
    equals LiteMLA's output before ``proj`` up to its eps: out_i = (A V)_i s_i / (s_i + eps)."""
    torch.manual_seed(0)
    case = CASES["efficientvit_mit"]
    model = built(case)
    x = torch.randn(B, 3, case.size, case.size)
    adapter = get_adapter(model)
    store, handles = {}, []
    for n, layer in enumerate(adapter.layers, start=1):
        if layer.pattern is not None:
            mla = layer.pattern.module
            handles += [
                _record(mla, "input", store, ("in", n)),
                _record(mla.proj, "input", store, ("out", n)),
            ]
    try:
        seen = _observe(adapter, model, x, {PATTERN})
    finally:
        for h in handles:
            h.remove()
    for n in case.patterns:
        mla, inp = adapter.layers[n - 1].pattern.module, store[("in", n)]
        hw = inp.shape[-2:]
        qkv = mla.qkv(inp)
        multi = torch.cat([qkv, *(op(qkv) for op in mla.aggreg)], dim=1)
        multi = multi.reshape(B, -1, 3 * mla.dim, hw[0] * hw[1]).transpose(-1, -2)
        q, k, v = multi.chunk(3, dim=-1)
        scores = F.relu(q) @ F.relu(k).transpose(-1, -2)  # explicit N x N, independent of vitspec
        sums = scores.sum(-1, keepdim=True)
        a = seen[(PATTERN, n)]
        torch.testing.assert_close(a, scores / sums, atol=1e-6, rtol=1e-5)
        out = (a @ v) * sums / (sums + mla.eps)
        torch.testing.assert_close(
            out.transpose(-1, -2).reshape(B, -1, *hw), store[("out", n)], atol=1e-5, rtol=1e-4
        )


def test_cascaded_attention_replay_matches_the_module():
    """EfficientViT-M: the replayed heads give the module's own output on its own input."""
    from vitspec.adapters.efficientvit_m import cascaded_attention

    torch.manual_seed(0)
    case = CASES["efficientvit_m"]
    model = built(case)
    cga = model.stages[0].blocks[0].mixer.m.attn
    store = {}
    handles = [_record(cga, "input", store, "in"), _record(cga, "output", store, "out")]
    try:
        with torch.no_grad():
            model(torch.randn(B, 3, case.size, case.size))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        _a, out = cascaded_attention(cga, store["in"])
    torch.testing.assert_close(out, store["out"])


def test_analyze_end_to_end(family):
    """Attention rows where the family has a pattern, the stated reasons where not, and the
    model is left as it was (same output, fused attention switches restored)."""
    name, case, model, x = family
    fused = {
        m: m.fused_attn for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)
    }
    with torch.no_grad():
        before = model(x)
    warnings = []
    result = vitspec.analyze(
        model, images=[x], metrics="hc_dc_ratio,attn_entropy", warn=warnings.append, pipeline=False
    )
    table = result.metrics
    attn = table[(table.site == "attn") & (table.metric == "attn_entropy") & (table["head"] == -1)]
    assert sorted(attn.layer) == sorted(case.patterns)
    blocks = table[(table.site == "block") & (table.metric == "hc_dc_ratio")]
    assert sorted(blocks.layer) == list(range(1, len(case.tokens)))
    stated = result.info["unavailable"]
    for site, words in case.missing.items():
        if site == PATTERN:
            assert any(k.startswith(f"{site} at layers") and words in v for k, v in stated.items())
    stages = result.info["stages"]
    assert stages[0]["first_layer"] == 1 and stages[-1]["last_layer"] == len(case.tokens) - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    assert {m: m.fused_attn for m in fused} == fused


@pytest.mark.parametrize(("name", "layers"), [("swin", [4]), ("maxvit", []), ("davit", [])])
def test_cross_layer_similarity_only_between_the_same_windows(name, layers):
    """Swin: only stage 2's two blocks share windows (7x7 grid = one window, no shift); the
    shifted block 2 and the stage change at 3 do not. MaxViT: block and grid windows alternate.
    DaViT: spatial blocks are never consecutive (channel blocks between)."""
    torch.manual_seed(0)
    case = CASES[name]
    x = torch.randn(B, 3, case.size, case.size)
    result = vitspec.analyze(
        case.build().eval(), images=[x], metrics="attn_cross_layer_sim", warn=lambda w: None
    )
    table = result.metrics
    assert sorted(set(table[table.site == "attn"].layer)) == layers


def test_linear_attention_query_subsample():
    """Above ``max_queries`` tokens the rows of a seeded, sorted subsample of queries: the same
    rows as the full row-normalised matrix, formed here explicitly."""
    from vitspec.adapters.efficientvit_mit import SEED, row_normalised

    torch.manual_seed(0)
    q, k = torch.rand(2, 3, 10, 4), torch.rand(2, 3, 10, 4)
    full = q @ k.transpose(-1, -2)
    full = full / full.sum(-1, keepdim=True)
    rows = torch.randperm(10, generator=torch.Generator().manual_seed(SEED))[:4].sort().values
    sub = row_normalised(q, k, max_queries=4)
    assert sub.shape == (2, 3, 4, 10)
    torch.testing.assert_close(sub, full[..., rows, :])
    torch.testing.assert_close(row_normalised(q, k), full)
