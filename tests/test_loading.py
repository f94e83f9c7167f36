"""Tests for vitspec.loading: every checkpoint layout, the hub-cache lookup and every user error."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitspec.errors import VitspecError
from vitspec.loading import (
    ALIASES,
    LoadedModel,
    find_cached_weights,
    load_model,
    read_checkpoint,
    resolve_model_name,
)

DEIT = "deit_tiny_patch16_224"
DEIT_DIST = "deit_tiny_distilled_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def make(name: str = DEIT, seed: int = 1, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = {**TINY, "num_classes": 10, **over}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def perturbed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that differs from model's in every floating tensor (stands in for EMA)."""
    return {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def assert_same(loaded: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32 or not v.is_floating_point(), k
        assert torch.equal(got[k], v), k


def raises(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(VitspecError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """No test may see the machine's real HF / torch hub caches."""
    hf, th = tmp_path / "hf_cache", tmp_path / "torch_hub"
    hf.mkdir()
    th.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(th))
    return hf, th


def test_offline_env_is_set():
    assert os.environ.get("HF_HUB_OFFLINE")


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_resolve_to_timm_models(alias):
    assert resolve_model_name(alias) == ALIASES[alias]
    assert timm.is_model(ALIASES[alias])


def test_timm_names_pass_through():
    assert resolve_model_name(DEIT) == DEIT
    assert resolve_model_name("resnet18") == "resnet18"
    assert resolve_model_name("deit_small_patch16_224.fb_in1k") == "deit_small_patch16_224.fb_in1k"


def test_unknown_name_suggests_closest_alias():
    msg = raises(
        r"unknown model 'deit_smal'; closest: .*deit_small", resolve_model_name, "deit_smal"
    )
    assert "deit_small" in msg
    raises(r"unknown model 'deit_smal'", load_model, "deit_smal", random_init=True)


def test_unknown_pretrained_tag():
    raises(
        r"unknown pretrained tag 'bogus' for deit_small_patch16_224",
        resolve_model_name,
        "deit_small_patch16_224.bogus",
    )


# ---------------------------------------------------------------- formats


def _write(kind: str, model: torch.nn.Module, path: Path) -> None:
    sd = model.state_dict()
    if kind == "state_dict":
        torch.save(sd, path)
    elif kind == "model":
        torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 3, "lr": 0.1}, path)
    elif kind == "state_dict_key":
        torch.save({"state_dict": sd, "epoch": 3, "arch": DEIT}, path)
    elif kind == "module_prefix":
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif kind == "deit_args":
        args = argparse.Namespace(lr=5e-4, model=DEIT)
        torch.save({"model": sd, "args": args, "epoch": 299}, path)
    elif kind == "pickled_module":
        torch.save(model, path)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:  # pragma: no cover
        raise AssertionError(kind)


FORMATS = [
    # kind, file name, expected format, loaded_key, needs trust (full unpickling), stripped prefix
    ("state_dict", "plain.pth", "state_dict", None, False, None),
    ("state_dict", "pytorch_model.bin", "state_dict", None, False, None),
    ("model", "train.pth", "model", "model", False, None),
    ("state_dict_key", "timm_train.pth.tar", "state_dict_key", "state_dict", False, None),
    ("module_prefix", "ddp.pth", "model", "model", False, "module."),
    ("deit_args", "deit.pth", "model", "model", False, None),
    ("pickled_module", "whole.pt", "pickled_module", None, True, None),
    ("safetensors", "model.safetensors", "safetensors", None, False, None),
]


@pytest.mark.parametrize(("kind", "fname", "fmt", "key", "trusted", "prefix"), FORMATS)
def test_every_format_loads_bit_identical(tmp_path, kind, fname, fmt, key, trusted, prefix):
    src = make()
    path = tmp_path / fname
    _write(kind, src, path)
    lm = load_model("deit_tiny", ckpt=path, model_kwargs=TINY, trust_checkpoint=trusted)
    assert isinstance(lm, LoadedModel)
    assert_same(lm.model, src.state_dict())
    assert not lm.model.training
    assert all(p.device.type == "cpu" for p in lm.model.parameters())
    assert (lm.name, lm.timm_name, lm.checkpoint) == ("deit_tiny", DEIT, fname)
    prov = lm.provenance
    assert prov["format"] == fmt and prov["loaded_key"] == key
    assert prov["trusted_pickle"] is trusted
    assert prov["stripped_prefix"] == prefix
    assert prov["source"] == "file"
    assert [w for w in prov["warnings"] if "full unpickling" not in w] == []
    assert len(prov["warnings"]) == int(trusted)
    assert prov["checkpoint_path"] == str(path.absolute())
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["num_classes"] == 10
    assert prov["filter"].endswith("checkpoint_filter_fn")
    json.dumps(prov)


def test_safetensors_detected_without_suffix(tmp_path):
    src = make()
    path = tmp_path / "weights.bin"
    save_file(src.state_dict(), str(path))
    lm = load_model(DEIT, ckpt=path, model_kwargs=TINY)
    assert lm.provenance["format"] == "safetensors"
    assert_same(lm.model, src.state_dict())


def test_read_checkpoint_returns_state_dict_and_info(tmp_path):
    src = make()
    path = tmp_path / "ddp.pth"
    _write("module_prefix", src, path)
    sd, info = read_checkpoint(path)
    assert set(sd) == set(src.state_dict())
    assert info["format"] == "model" and info["loaded_key"] == "model"


# ---------------------------------------------------------------- EMA


@pytest.mark.parametrize(
    ("reg", "ema_key"), [("model", "model_ema"), ("state_dict", "state_dict_ema")]
)
def test_ema_checkpoint_loads_regular_weights_unless_asked(tmp_path, reg, ema_key):
    src = make()
    ema_sd = perturbed(src)
    path = tmp_path / "ckpt.pth"
    torch.save({reg: src.state_dict(), ema_key: ema_sd, "epoch": 9}, path)

    lm = load_model(DEIT, ckpt=path, model_kwargs=TINY)
    assert_same(lm.model, src.state_dict())
    assert lm.provenance["loaded_key"] == reg

    lm_ema = load_model(DEIT, ckpt=path, model_kwargs=TINY, ema=True)
    assert_same(lm_ema.model, ema_sd)
    assert lm_ema.provenance["loaded_key"] == ema_key


def test_ema_without_ema_weights_names_the_keys(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": make().state_dict(), "epoch": 9}, path)
    msg = raises(
        r"no EMA weights .*top-level keys: model, epoch",
        load_model,
        DEIT,
        ckpt=path,
        model_kwargs=TINY,
        ema=True,
    )
    assert "ckpt.pth" in msg
    st = tmp_path / "w.safetensors"
    save_file(make().state_dict(), str(st))
    raises(r"no EMA weights", load_model, DEIT, ckpt=st, model_kwargs=TINY, ema=True)


def test_only_ema_weights_hints_at_ema(tmp_path):
    path = tmp_path / "ema_only.pth"
    torch.save({"model_ema": make().state_dict(), "epoch": 1}, path)
    raises(
        r"unknown layout.*top-level keys: model_ema, epoch.*ema=True",
        load_model,
        DEIT,
        ckpt=path,
        model_kwargs=TINY,
    )


# ---------------------------------------------------------------- heads and resampling


def test_head_size_is_taken_from_checkpoint(tmp_path):
    src = make(DEIT_DIST, num_classes=7)
    path = tmp_path / "dist.pth"
    torch.save({"model": src.state_dict()}, path)
    lm = load_model(DEIT_DIST, ckpt=path, model_kwargs=TINY)
    assert lm.model.num_classes == 7 and lm.model.head_dist.out_features == 7
    assert lm.provenance["num_classes"] == 7
    assert_same(lm.model, src.state_dict())


def test_headless_checkpoint_gives_headless_model(tmp_path):
    src = make(num_classes=0)
    path = tmp_path / "headless.pth"
    torch.save(src.state_dict(), path)
    lm = load_model(DEIT, ckpt=path, model_kwargs=TINY)
    assert lm.model.num_classes == 0
    assert_same(lm.model, src.state_dict())


def test_requested_num_classes_drops_checkpoint_head(tmp_path):
    src = make(DEIT_DIST, num_classes=7)
    path = tmp_path / "dist.pth"
    torch.save(src.state_dict(), path)
    lm = load_model(DEIT_DIST, ckpt=path, model_kwargs={**TINY, "num_classes": 3})
    assert lm.model.num_classes == 3
    (warning,) = lm.provenance["warnings"]
    assert "7 classes" in warning and "num_classes=3" in warning
    body = {k: v for k, v in src.state_dict().items() if not k.startswith(("head.", "head_dist."))}
    got = lm.model.state_dict()
    for k, v in body.items():
        assert torch.equal(got[k], v), k


def test_pos_embed_is_resampled_to_a_larger_image(tmp_path):
    src = make()  # 32 px, patch 8 -> 4x4 grid
    path = tmp_path / "small.pth"
    torch.save(src.state_dict(), path)
    lm = load_model(DEIT, ckpt=path, model_kwargs={**TINY, "img_size": 48})  # 6x6 grid
    assert lm.model.pos_embed.shape == (1, 1 + 36, 32)
    assert lm.provenance["resampled"] == ["pos_embed [1,17,32] -> [1,37,32]"]
    got = lm.model.state_dict()
    for k, v in src.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(got[k], v), k
    assert torch.equal(got["pos_embed"][:, :1], src.pos_embed[:, :1])  # class token untouched


def test_patch_size_mismatch_is_not_silently_resampled(tmp_path):
    path = tmp_path / "p8.pth"
    torch.save(make().state_dict(), path)
    kwargs = {**TINY, "patch_size": 4}
    raises(
        r"does not fit deit_tiny_patch16_224: .*patch_embed\.proj\.weight \[32,3,8,8\] -> "
        r"\[32,3,4,4\]",
        load_model,
        DEIT,
        ckpt=path,
        model_kwargs=kwargs,
    )
    lm = load_model(DEIT, ckpt=path, model_kwargs=kwargs, strict=False)
    assert any("patch_embed.proj.weight" in w for w in lm.provenance["warnings"])


# ---------------------------------------------------------------- key problems


def test_wrong_architecture_lists_unexpected_and_missing(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    msg = raises(
        r"checkpoint does not fit deit_tiny_patch16_224: \d+ unexpected keys "
        r"\(conv1\.weight, .*\), \d+ missing \(cls_token, .*",
        load_model,
        DEIT,
        ckpt=path,
        model_kwargs=TINY,
    )
    assert "blocks.0.attn.qkv.weight" in msg and "r18.pth" in msg
    raises(r"no key matches", load_model, DEIT, ckpt=path, model_kwargs=TINY, strict=False)


def test_shape_mismatch_names_the_key(tmp_path):
    path = tmp_path / "d32.pth"
    torch.save(make().state_dict(), path)
    raises(
        r"shape mismatches \(.*blocks\.0\.attn\.qkv\.weight \[96,32\] vs model \[144,48\]",
        load_model,
        DEIT,
        ckpt=path,
        model_kwargs={**TINY, "embed_dim": 48},
    )


def test_strict_false_downgrades_to_warnings(tmp_path):
    src = make()
    sd = src.state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(3)
    sd["head.bias"] = torch.zeros(4)  # shape mismatch (head has 10 classes)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    msg = raises(
        r"1 unexpected keys \(extra\.weight\), 1 missing \(norm\.weight\), "
        r"1 shape mismatches \(head\.bias \[4\] vs model \[10\]\)",
        load_model,
        DEIT,
        ckpt=path,
        model_kwargs=TINY,
    )
    assert "partial.pth" in msg

    lm = load_model(DEIT, ckpt=path, model_kwargs=TINY, strict=False)
    warnings = " | ".join(lm.provenance["warnings"])
    assert "extra.weight" in warnings and "norm.weight" in warnings and "head.bias" in warnings
    got = lm.model.state_dict()
    for k, v in src.state_dict().items():
        if k not in ("norm.weight", "head.bias"):
            assert torch.equal(got[k], v), k
    json.dumps(lm.provenance)


# ---------------------------------------------------------------- unreadable files


def test_missing_file_and_directory(tmp_path):
    raises(r"checkpoint not found: .*nope\.pth", load_model, DEIT, ckpt=tmp_path / "nope.pth")
    raises(r"checkpoint is a directory.*", load_model, DEIT, ckpt=tmp_path)
    raises(r"checkpoint not found", read_checkpoint, tmp_path / "nope.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_files(tmp_path, suffix, damage):
    good = tmp_path / f"good{suffix}"
    _write("safetensors" if suffix == ".safetensors" else "model", make(), good)
    bad = tmp_path / f"bad{suffix}"
    data = good.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(bytes(range(256)) * 4)
    else:
        bad.write_bytes(b"")
    msg = raises(
        rf"cannot read checkpoint .*bad\{suffix}: \w+",
        load_model,
        DEIT,
        ckpt=bad,
        model_kwargs=TINY,
    )
    assert len(msg) < 400
    if suffix == ".pth" and damage == "truncated":
        assert "truncated or corrupt" in msg
    if suffix == ".pth" and damage == "garbage":
        assert "not a PyTorch or safetensors file" in msg


def test_text_file_and_npz_are_rejected(tmp_path):
    txt = tmp_path / "notes.pth"
    txt.write_text("hello, I am not a checkpoint\n")
    raises(
        r"cannot read checkpoint .*notes\.pth: not a PyTorch or safetensors file",
        load_model,
        DEIT,
        ckpt=txt,
    )
    npz = tmp_path / "jax.npz"
    npz.write_bytes(b"PK\x03\x04")
    raises(r"cannot read checkpoint .*\.npz \(JAX\)", load_model, DEIT, ckpt=npz)


def test_unknown_layout_names_top_level_keys(tmp_path):
    path = tmp_path / "opt.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    raises(r"unknown layout.*top-level keys: epoch, optimizer", load_model, DEIT, ckpt=path)
    empty = tmp_path / "empty_dict.pth"
    torch.save({}, empty)
    raises(r"unknown layout.*top-level keys: none", load_model, DEIT, ckpt=empty)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], lst)
    raises(r"holds a list, not a state dict", load_model, DEIT, ckpt=lst)
    bad_model = tmp_path / "bad_model.pth"
    torch.save({"model": {"a": 1}}, bad_model)
    raises(r"'model' is not a state dict of tensors", load_model, DEIT, ckpt=bad_model)


# ---------------------------------------------------------------- random init and options


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = load_model("deit_tiny", random_init=True, seed=3, model_kwargs=TINY)
    b = load_model("deit_tiny", random_init=True, seed=3, model_kwargs=TINY)
    c = load_model("deit_tiny", random_init=True, seed=4, model_kwargs=TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert_same(b.model, a.model.state_dict())
    assert not torch.equal(a.model.blocks[0].attn.qkv.weight, c.model.blocks[0].attn.qkv.weight)
    assert a.checkpoint == "random-init"
    assert a.provenance["source"] == "random-init" and a.provenance["seed"] == 3
    assert not a.model.training
    json.dumps(a.provenance)


def test_random_init_resnet_works():
    lm = load_model("resnet18", random_init=True)
    assert lm.timm_name == "resnet18" and lm.checkpoint == "random-init"


def test_random_init_and_ckpt_are_exclusive(tmp_path):
    raises(
        r"random_init and ckpt are mutually exclusive",
        load_model,
        DEIT,
        ckpt=tmp_path / "x",
        random_init=True,
    )


def test_bad_model_kwargs():
    raises(
        r"model_kwargs may not set pretrained",
        load_model,
        DEIT,
        random_init=True,
        model_kwargs={"pretrained": True},
    )
    raises(
        r"cannot create deit_tiny_patch16_224 with model_kwargs",
        load_model,
        DEIT,
        random_init=True,
        model_kwargs={"no_such_option": 1},
    )


# ---------------------------------------------------------------- local caches


def test_no_ckpt_and_no_cache():
    raises(
        r"^no local weights for deit_small_patch16_224: pass --ckpt FILE or --random-init$",
        load_model,
        "deit_small",
    )
    assert find_cached_weights("deit_small_patch16_224") is None


def _hf_snapshot(cache: Path, repo_id: str, filename: str) -> Path:
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap / filename


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_weights_found_in_hf_cache(empty_caches, filename):
    hf_cache, _ = empty_caches
    repo_id = timm.models.get_pretrained_cfg(DEIT).hf_hub_id
    assert repo_id == "timm/deit_tiny_patch16_224.fb_in1k"
    src = make()
    target = _hf_snapshot(hf_cache, repo_id, filename)
    if filename.endswith(".safetensors"):
        save_file(src.state_dict(), str(target))
    else:
        torch.save(src.state_dict(), target)
    lm = load_model("deit_tiny", model_kwargs=TINY)
    assert_same(lm.model, src.state_dict())
    assert lm.checkpoint == filename
    assert lm.provenance["source"] == "hub-cache"
    assert lm.provenance["checkpoint_path"] == str(target)
    assert repo_id in lm.provenance["hub_location"]


def test_weights_found_in_torch_hub_cache(empty_caches):
    _, hub = empty_caches
    url = timm.models.get_pretrained_cfg(DEIT).url
    target = hub / "checkpoints" / os.path.basename(url)
    target.parent.mkdir()
    src = make()
    torch.save({"model": src.state_dict()}, target)  # FB's layout
    lm = load_model(DEIT, model_kwargs=TINY)
    assert_same(lm.model, src.state_dict())
    assert lm.provenance["source"] == "hub-cache" and lm.provenance["hub_location"] == url
    assert lm.checkpoint == os.path.basename(url)
