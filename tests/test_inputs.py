"""Tests for vitspec.inputs: listing, decoding, skipping, batching, timm transform, bundled set."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

from vitspec.errors import VitspecError
from vitspec.inputs import (
    IMAGE_EXTENSIONS,
    ImageSet,
    bundled_images_dir,
    eval_data_config,
    eval_transform,
    iter_batches,
    open_images,
    synthetic_batches,
)


def _rgb(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _write_valid(folder):
    """A folder with one readable image of every supported kind, plus junk. Returns sorted rels."""
    (folder / "sub" / "deeper").mkdir(parents=True)
    _rgb(0).save(folder / "a_rgb.jpg", quality=95)
    _rgb(1).convert("L").save(folder / "b_grey.png")
    _rgb(2).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "c_palette.png")
    rgba = _rgb(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "d_rgba.png")
    _rgb(4).save(folder / "e.bmp")
    _rgb(5).save(folder / "f.webp", quality=90)
    _rgb(6).save(folder / "sub" / "g.tif")
    _rgb(7).save(folder / "sub" / "deeper" / "h_upper.JPEG", format="JPEG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(b"resource fork")
    return [
        "a_rgb.jpg",
        "b_grey.png",
        "c_palette.png",
        "d_rgba.png",
        "e.bmp",
        "f.webp",
        "sub/deeper/h_upper.JPEG",
        "sub/g.tif",
    ]


def _write_bad(folder):
    buf = folder / "tmp_full.jpg"
    _rgb(9, size=(120, 90)).save(buf, quality=95)
    data = buf.read_bytes()
    buf.unlink()
    (folder / "a_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "b_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return ["a_truncated.jpg", "b_garbage.png"]


def _identity(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float tensor in 0..255, no resizing (all test images are 40x30)."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16, depth=1
    ).eval()


def _collect(images, transform=_identity, batch_size=3, **kw):
    warnings: list[str] = []
    batches = list(iter_batches(images, transform, batch_size, warn=warnings.append, **kw))
    return batches, warnings


# --- listing -----------------------------------------------------------------------------------


def test_listing_is_recursive_sorted_and_filtered(tmp_path):
    expected = _write_valid(tmp_path)
    images = open_images(tmp_path)
    assert isinstance(images, ImageSet)
    assert images.source == str(tmp_path.absolute())
    assert [images.relpath(p) for p in images.paths] == expected
    assert images.num_images is None and images.used == [] and images.skipped == []
    assert ".tiff" in IMAGE_EXTENSIONS


def test_relative_folder_is_made_absolute(tmp_path, monkeypatch):
    _write_valid(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    images = open_images("imgs")
    assert images.source == str(tmp_path / "imgs")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(VitspecError, match="image folder or file not found: .*nope"):
        open_images(tmp_path / "nope")
    (tmp_path / "file.txt").write_bytes(b"x")
    with pytest.raises(VitspecError, match="is not an image file"):
        open_images(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(VitspecError, match=r"no images \(jpg, jpeg, png, bmp, webp, tif\) in "):
        open_images(empty)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_num_images_must_be_positive_int(tmp_path, bad):
    _write_valid(tmp_path)
    with pytest.raises(VitspecError, match="num_images"):
        open_images(tmp_path, num_images=bad)


def test_batch_size_checked_eagerly(tmp_path):
    _write_valid(tmp_path)
    with pytest.raises(VitspecError, match="batch_size"):
        iter_batches(open_images(tmp_path), _identity, 0)


# --- decoding, skipping ------------------------------------------------------------------------


def test_all_modes_become_rgb_and_bad_files_are_skipped(tmp_path):
    good = _write_valid(tmp_path)
    bad = _write_bad(tmp_path)
    images = open_images(tmp_path)
    batches, warnings = _collect(images, batch_size=3)
    assert [b.shape[0] for b in batches] == [3, 3, 2]
    assert all(b.dtype == torch.float32 and b.shape[1:] == (3, 30, 40) for b in batches)
    assert images.used == good
    assert [s["path"] for s in images.skipped] == bad
    assert all(s["reason"] for s in images.skipped)
    assert len(warnings) == 2
    for name, line in zip(bad, warnings):
        assert line.startswith(f"skipping unreadable image {name}: ")
        assert "\n" not in line
    # the grey image has three equal channels
    grey = torch.cat(batches)[good.index("b_grey.png")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_default_warn_prints_one_line_per_file(tmp_path, capsys):
    _write_valid(tmp_path)
    _write_bad(tmp_path)
    list(iter_batches(open_images(tmp_path), _identity, 4))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("skipping unreadable image a_truncated.jpg: ")
    assert err[1].startswith("skipping unreadable image b_garbage.png: ")


def test_first_n_readable_skips_do_not_count(tmp_path):
    good = _write_valid(tmp_path)
    _write_bad(tmp_path)  # a_truncated.jpg sorts between a_rgb.jpg and b_grey.png
    images = open_images(tmp_path, num_images=3)
    batches, warnings = _collect(images, batch_size=2)
    assert images.used == good[:3]
    assert [b.shape[0] for b in batches] == [2, 1]
    assert [s["path"] for s in images.skipped] == ["a_truncated.jpg", "b_garbage.png"]
    assert len(warnings) == 2


def test_no_file_after_the_nth_is_opened(tmp_path, monkeypatch):
    _write_valid(tmp_path)
    from vitspec import inputs

    opened = []
    real = inputs._read
    monkeypatch.setattr(inputs, "_read", lambda p: (opened.append(p.name), real(p))[1])
    images = open_images(tmp_path, num_images=2)
    _collect(images, batch_size=8)
    assert sorted(opened) == ["a_rgb.jpg", "b_grey.png"]


def test_only_bad_files_is_an_error_naming_them(tmp_path):
    _write_bad(tmp_path)
    images = open_images(tmp_path)
    warnings: list[str] = []
    with pytest.raises(VitspecError) as err:
        list(iter_batches(images, _identity, 2, warn=warnings.append))
    msg = str(err.value)
    assert msg.startswith(f"no readable image in {tmp_path}")
    assert "2 files skipped: a_truncated.jpg, b_garbage.png" in msg
    assert "\n" not in msg
    assert len(warnings) == 2


def test_reiterating_resets_used_and_skipped(tmp_path):
    _write_valid(tmp_path)
    _write_bad(tmp_path)
    images = open_images(tmp_path)
    first, _ = _collect(images)
    used, skipped = list(images.used), list(images.skipped)
    second, _ = _collect(images)
    assert images.used == used and images.skipped == skipped
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- prefetching -------------------------------------------------------------------------------


def _sequential(images, transform):
    """Reference: a plain loop with no threads."""
    out = []
    for p in images.paths:
        try:
            with Image.open(p) as img:
                img.load()
                rgb = img.convert("RGB")
        except OSError:
            rgb = None
        if rgb is not None:
            out.append(transform(rgb))
    return torch.stack(out)


@pytest.mark.parametrize("batch_size,workers", [(1, 2), (2, 2), (3, 4), (100, 2), (2, 1)])
def test_prefetch_order_equals_sequential(tmp_path, batch_size, workers):
    _write_valid(tmp_path)
    _write_bad(tmp_path)
    for i in range(12):  # more files than the prefetch window
        _rgb(100 + i).save(tmp_path / "sub" / f"x{i:02d}.png")
    images = open_images(tmp_path)
    batches, _ = _collect(images, batch_size=batch_size, num_workers=workers)
    assert torch.equal(torch.cat(batches), _sequential(images, _identity))
    assert all(b.shape[0] == batch_size for b in batches[:-1])


def _decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("vitspec-decode")]


def test_pool_shut_down_when_closed_early(tmp_path):
    _write_valid(tmp_path)
    before = len(_decode_threads())
    it = iter_batches(open_images(tmp_path), _identity, 1, warn=lambda m: None)
    next(it)
    assert len(_decode_threads()) > before
    it.close()
    assert len(_decode_threads()) == before
    it = iter_batches(open_images(tmp_path), _identity, 1, warn=lambda m: None)
    next(it)
    del it
    gc.collect()
    assert len(_decode_threads()) == before


# --- timm transform ----------------------------------------------------------------------------


def test_eval_transform_matches_timm(tmp_path, tiny_model):
    _write_valid(tmp_path)
    cfg = timm.data.resolve_model_data_config(tiny_model)
    ours = eval_data_config(tiny_model)
    # timm keeps the pretrained 224 for a model built with img_size=64; we follow the model
    assert cfg["input_size"] == (3, 224, 224)
    assert ours == {**cfg, "input_size": (3, 64, 64)}
    timm_tf = timm.data.create_transform(**ours, is_training=False)
    tf = eval_transform(tiny_model)
    images = open_images(tmp_path)
    batches, _ = _collect(images, transform=tf, batch_size=4)
    x = torch.cat(batches)
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32
    for rel, got in zip(images.used, x):
        with Image.open(images.root / rel) as img:
            expected = timm_tf(img.convert("RGB"))
        assert torch.equal(got, expected)
    with torch.no_grad():
        assert tiny_model(x[:2]).shape == (2, 1000)


def test_eval_transform_default_model_is_timms(tiny_model):
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1)
    assert eval_data_config(m) == timm.data.resolve_model_data_config(m)
    dyn = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=64, dynamic_img_size=True)
    assert eval_data_config(dyn)["input_size"] == (3, 224, 224)


def test_grey_image_equals_transform_of_rgb_version(tmp_path, tiny_model):
    grey = _rgb(11, size=(90, 70)).convert("L")
    grey.save(tmp_path / "grey.png")
    tf = eval_transform(tiny_model)
    (batch,) = list(iter_batches(open_images(tmp_path), tf, 4))
    assert torch.equal(batch[0], tf(grey.convert("RGB")))
    # undo normalisation: the three channels are equal
    cfg = eval_data_config(tiny_model)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    raw = batch[0] * std + mean
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


# --- bundled set -------------------------------------------------------------------------------


def test_bundled_set_readable_and_licensed(tiny_model):
    images = open_images()
    assert images.source == "bundled"
    assert images.root == bundled_images_dir()
    names = [p.name for p in images.paths]
    assert len(names) >= 10
    licences = (bundled_images_dir() / "LICENSES").read_text(encoding="utf-8")
    for name in names:
        assert name in licences, f"{name} missing from LICENSES"
    total = sum(p.stat().st_size for p in images.paths)
    assert total < 1_000_000
    batches, warnings = _collect(images, transform=eval_transform(tiny_model), batch_size=4)
    assert warnings == [] and images.skipped == []
    assert images.used == names
    assert torch.cat(batches).shape == (len(names), 3, 64, 64)
    for p in images.paths:
        with Image.open(p) as img:
            assert min(img.size) == 256


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_batches_deterministic_and_split_invariant():
    a = list(synthetic_batches(5, 2, (8, 12), seed=3))
    assert [b.shape for b in a] == [(2, 3, 8, 12), (2, 3, 8, 12), (1, 3, 8, 12)]
    assert all(b.dtype == torch.float32 for b in a)
    b = torch.cat(list(synthetic_batches(5, 5, (8, 12), seed=3)))
    assert torch.equal(torch.cat(a), b)
    c = torch.cat(list(synthetic_batches(5, 5, (8, 12), seed=4)))
    assert not torch.equal(b, c)
    with pytest.raises(VitspecError):
        next(synthetic_batches(0, 2, (8, 8)))
