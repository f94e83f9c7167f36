"""Never lose a user's files or hours: output folders, checks before the work, safe checkpoints,
comparisons of like with like, deep and high-resolution models, progress, image selection,
non-finite activations, listing. Each case checks its message and exit code, in-process and
through the CLI."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

import vitspec
from vitspec.cli import main
from vitspec.errors import VitspecError

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_ARGS = [a for k, v in TINY.items() for a in ("--model-arg", f"{k}={v}")]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(code, err, expected_code, *fragments):
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vitspec: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr("vitspec.loading._create", refuse)


def analyze_cli(capsys, out, *extra):
    return run(
        capsys,
        "analyze",
        "deit_tiny",
        "--random-init",
        *TINY_ARGS,
        "--num-images",
        2,
        "--no-figures",
        "--out",
        out,
        *extra,
    )


# 1. Output folders ----------------------------------------------------------------------------


def test_overwrite_never_replaces_a_folder_vitspec_did_not_write(capsys, tmp_path, no_model):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, err = analyze_cli(capsys, precious, "--overwrite")
    one_line(code, err, 2, "refusing to replace", "not a vitspec output", "thesis.tex")
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no temporary folder


@pytest.mark.parametrize("where", [".", "..", "home", "ancestor", "images"])
def test_overwrite_never_replaces_precious_places(capsys, tmp_path, monkeypatch, no_model, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.png")
    out = {
        ".": ".",
        "..": "..",
        "home": str(tmp_path / "a"),
        "ancestor": str(tmp_path),
        "images": str(images),
    }[where]
    code, err = analyze_cli(capsys, out, "--overwrite", "--images", images)
    one_line(code, err, 2, "refusing to")
    assert (work / "keep.txt").exists() and (images / "x.png").exists()


def test_api_overwrite_refuses_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(VitspecError, match=r"refusing to replace \. \(the current directory\)"):
        vitspec.analyze(
            "deit_tiny", random_init=True, model_kwargs=TINY, num_images=1, out=".", overwrite=True
        )
    assert (tmp_path / "keep.txt").exists()


def test_previous_run_is_replaced_but_not_one_holding_a_user_file(capsys, tmp_path):
    out = tmp_path / "run"
    code, err = analyze_cli(capsys, out)
    assert code == 0, err
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["written_by"] == "vitspec"
    assert manifest["files"] == ["metrics.csv", "run.json", "spectra.csv"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700
    code, err = analyze_cli(capsys, out)
    one_line(code, err, 2, "exists; pass --overwrite")
    code, err = analyze_cli(capsys, out, "--overwrite")
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    code, err = analyze_cli(capsys, out, "--overwrite")
    one_line(code, err, 2, "files vitspec did not write", "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("bad", ["/proc/vitspec-x", "file/x"])
def test_unwritable_output_fails_before_any_model_is_built(capsys, tmp_path, no_model, bad):
    (tmp_path / "file").write_text("")
    out = bad if bad.startswith("/") else tmp_path / bad
    start = time.perf_counter()
    code, err = analyze_cli(capsys, out)
    one_line(code, err, 2, "cannot write to")
    assert time.perf_counter() - start < 5


def test_sigterm_leaves_no_hidden_folder(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "vitspec.cli",
        "analyze",
        "deit_tiny",
        "--random-init",
        "--model-arg",
        "depth=12",
        "--num-images",
        "11",
        "--batch-size",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    while not any("images:" in line for line in lines):  # the run has started
        line = proc.stderr.readline()
        assert line, "".join(lines)
        lines.append(line)
    assert any(p.name.startswith(".run.vitspec-tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


# 2. Every check before the work ---------------------------------------------------------------

BAD_ARGS = [
    (["--num-images", "0"], "--num-images"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "mps"], "unknown device 'mps'"),
    (["--metrics", "foo"], "no metric matches --metrics 'foo'"),
    (["--sites", "bogus"], "unknown site 'bogus'"),
    (["--images", "/no/such/folder"], "/no/such/folder"),
    (["--num-images", "99"], "--num-images is 99 but only 11 image files were found"),
    (["--sample", "sideways"], "--sample"),
    (["--model-arg", "depth"], "KEY=VALUE"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_ARGS, ids=[a[0][0] for a in BAD_ARGS])
def test_bad_arguments_fail_in_one_line_before_any_work(capsys, tmp_path, no_model, argv, fragment):
    out = tmp_path / "run"
    code, err = run(capsys, "analyze", "deit_tiny", "--random-init", "--out", out, *argv)
    one_line(code, err, 2, fragment)
    assert list(tmp_path.iterdir()) == []  # the claimed temporary folder is gone too


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(num_images=0), "num_images must be"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(device="mps"), "unknown device 'mps'"),
        (dict(metrics="foo"), "no metric matches metrics 'foo'"),
        (dict(sites=["bogus"]), "unknown site 'bogus'"),
        (dict(images="/no/such/folder"), "not found: /no/such/folder"),
        (dict(sample="sideways"), "sample must be one of first, random"),
        (dict(img_size=0), "img_size must be"),
    ],
)
def test_api_checks_everything_first_with_parameter_names(no_model, kwargs, fragment):
    with pytest.raises(VitspecError, match=fragment):
        vitspec.analyze("deit_tiny", random_init=True, **kwargs)


def test_verify_checks_arguments_before_the_model(capsys, tmp_path, no_model):
    code, err = run(
        capsys, "verify", "deit_tiny", "--random-init", "--out", tmp_path / "v", "--metrics-typo"
    )
    assert code == 2 and "unrecognized arguments" in err and len(err.splitlines()) == 1
    code, err = run(
        capsys,
        "verify",
        "deit_tiny",
        "--random-init",
        "--out",
        tmp_path / "v",
        "--images",
        tmp_path / "nothing",
    )
    one_line(code, err, 2, "nothing")


# 3. Safe checkpoint loading -------------------------------------------------------------------


def _tiny_model(**extra):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **{**TINY, **extra})


def test_pickled_module_needs_trust_checkpoint(capsys, tmp_path):
    model = _tiny_model()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    out = tmp_path / "run"
    code, err = run(
        capsys,
        "analyze",
        "deit_tiny",
        "--ckpt",
        path,
        *TINY_ARGS,
        "--num-images",
        1,
        "--no-figures",
        "--out",
        out,
    )
    one_line(code, err, 2, "needs full unpickling", "VisionTransformer", "--trust-checkpoint")
    assert not out.exists()
    with pytest.raises(VitspecError, match="trust_checkpoint=True"):
        vitspec.analyze("deit_tiny", ckpt=path, model_kwargs=TINY, num_images=1)
    code, err = run(
        capsys,
        "analyze",
        "deit_tiny",
        "--ckpt",
        path,
        *TINY_ARGS,
        "--num-images",
        1,
        "--no-figures",
        "--out",
        out,
        "--trust-checkpoint",
    )
    assert code == 0, err
    assert "warning: whole.pt was read with full unpickling (--trust-checkpoint)" in err
    assert json.loads((out / "run.json").read_text())["weights"]["trusted_pickle"] is True


def test_training_checkpoint_with_namespace_and_numpy_loads_safely(tmp_path):
    model = _tiny_model()
    path = tmp_path / "train.pth"
    args = argparse.Namespace(lr=5e-4, output_dir=Path("/tmp/out"), model="deit_tiny")
    torch.save(
        {
            "model": model.state_dict(),
            "args": args,
            "epoch": 3,
            "best_acc": np.float64(71.2),
            "dtype": np.dtype("float32"),
            "hist": np.arange(3),
        },
        path,
    )
    result = vitspec.analyze(
        "deit_tiny", ckpt=path, model_kwargs=TINY, num_images=1, metrics="hc_dc_ratio"
    )
    assert result.info["weights"]["trusted_pickle"] is False


# 4. Compare like with like --------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs: random-init seeds 0 and 1 on the bundled photos, seed 0 on noise images."""
    root = tmp_path_factory.mktemp("cmp")
    noise = root / "noise-images"
    noise.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), np.uint8)).save(
            noise / f"n{i}.png"
        )
    dirs = {}
    for name, images, seed in (("photos", None, 0), ("photos-seed1", None, 1), ("noise", noise, 0)):
        dirs[name] = root / name
        vitspec.analyze(
            "deit_tiny",
            random_init=True,
            seed=seed,
            model_kwargs=TINY,
            num_images=2,
            images=images,
            metrics="patch_cos_abs,hc_dc_ratio",
            out=dirs[name],
        )
    return dirs


def test_compare_refuses_different_images_unless_allowed(capsys, tmp_path, runs):
    a, b = runs["photos"], runs["noise"]
    out = tmp_path / "cmp"
    code, err = run(capsys, "compare", a, b, "--out", out)
    one_line(code, err, 2, "different images", "bundled", "--allow-different-images")
    assert not out.exists()
    code, err = run(capsys, "compare", a, b, "--out", out, "--allow-different-images", "--quiet")
    assert code == 0, err
    diffs = pd.read_csv(out / "differences.csv")
    assert len(diffs) and not diffs["same_images"].any()
    info = json.loads((out / "compare.json").read_text())
    assert "bundled" in info["images_differ"]
    with pytest.raises(VitspecError, match="allow_different_images=True"):
        vitspec.compare([a, b], None)


def test_compare_refuses_one_run_twice(capsys, tmp_path, runs):
    a = runs["photos"]
    code, err = run(capsys, "compare", a, str(a) + "/", "--out", tmp_path / "c")
    one_line(code, err, 2, "given twice")
    assert not (tmp_path / "c").exists()


def test_compare_without_out_writes_nothing(runs):
    root = runs["photos"].parent
    before = sorted(p.name for p in root.iterdir())
    result = vitspec.compare([runs["photos"], runs["photos-seed1"]], None)
    assert result.differences["same_images"].all() and len(result.differences)
    assert sorted(p.name for p in root.iterdir()) == before


# 5. Deep and high-resolution models -----------------------------------------------------------

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2)
SMALL_ARGS = [a for k, v in SMALL.items() for a in ("--model-arg", f"{k}={v}")]


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", depth=24, **SMALL)
    path = tmp_path_factory.mktemp("deep") / "deep.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_deep_checkpoint_needs_the_depth_and_is_never_cut(capsys, tmp_path, deep_ckpt):
    out = tmp_path / "run"
    for extra in ([], ["--non-strict"]):
        code, err = run(
            capsys,
            "analyze",
            "deit_small",
            "--ckpt",
            deep_ckpt,
            *SMALL_ARGS,
            "--num-images",
            1,
            "--out",
            out,
            *extra,
        )
        one_line(
            code,
            err,
            2,
            "checkpoint has 24 blocks, deit_small_patch16_224 has 12: pass --model-arg depth=24",
        )
    with pytest.raises(VitspecError, match=r"model_kwargs=\{'depth': 24\}"):
        vitspec.analyze("deit_small", ckpt=deep_ckpt, model_kwargs=SMALL, num_images=1)
    code, err = run(
        capsys,
        "analyze",
        "deit_small",
        "--ckpt",
        deep_ckpt,
        *SMALL_ARGS,
        "--model-arg",
        "depth=24",
        "--num-images",
        1,
        "--out",
        out,
        "--no-figures",
        "--metrics",
        "hc_dc_ratio",
        "--quiet",
    )
    assert code == 0, err
    info = json.loads((out / "run.json").read_text())
    assert info["depth"] == 24
    layers = pd.read_csv(out / "metrics.csv").query("site == 'block'")["layer"]
    assert sorted(set(layers)) == list(range(1, 25))


def test_distilled_checkpoint_into_a_plain_deit_names_the_distilled_model(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", **TINY)
    path = tmp_path / "distilled.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(VitspecError, match="use deit_tiny_distilled_patch16_224"):
        vitspec.analyze("deit_tiny", ckpt=path, model_kwargs=TINY, strict=False, num_images=1)


def test_img_size_analyses_dinov2_on_a_16x16_grid(capsys, tmp_path):
    out = tmp_path / "run"
    code, err = run(
        capsys,
        "analyze",
        "vit_small_patch14_dinov2",
        "--random-init",
        "--img-size",
        224,
        "--model-arg",
        "depth=2",
        "--num-images",
        1,
        "--metrics",
        "hc_dc_ratio",
        "--no-figures",
        "--out",
        out,
    )
    assert code == 0, err
    assert "1 prefix + 16x16 grid), 224x224 images" in err
    info = json.loads((out / "run.json").read_text())
    assert info["grid"] == [16, 16]


def test_img_size_resamples_a_checkpoints_position_embedding(capsys, tmp_path):
    model = _tiny_model()  # 32 px, patch 8: a 4x4 grid
    path = tmp_path / "small.pth"
    torch.save(model.state_dict(), path)
    args = [a for k, v in TINY.items() if k != "img_size" for a in ("--model-arg", f"{k}={v}")]
    out = tmp_path / "run"
    code, err = run(
        capsys,
        "analyze",
        "deit_tiny",
        "--ckpt",
        path,
        *args,
        "--img-size",
        48,
        "--num-images",
        1,
        "--metrics",
        "hc_dc_ratio",
        "--no-figures",
        "--out",
        out,
    )
    assert code == 0, err
    assert "position embeddings were resampled from 4x4 to 6x6" in err
    resampled = json.loads((out / "run.json").read_text())["weights"]["pos_embed_resampled"]
    assert resampled["from"] == [4, 4] and resampled["to"] == [6, 6]
    assert "bicubic" in resampled["method"]


# 6. Progress a scheduler log can show ---------------------------------------------------------


def test_progress_lines_with_eta_when_stderr_is_not_a_terminal(capsys, tmp_path, deep_ckpt):
    out = tmp_path / "run"
    code, err = analyze_cli(capsys, out, "--batch-size", 1)
    assert code == 0, err
    lines = err.splitlines()
    assert any("ETA" in line and "1/2 images" in line for line in lines[:-1]), err
    for fragment in (
        "weights: RANDOM",
        "model deit_tiny_patch16_224: 2 blocks",
        "images: 11 found in bundled photos, using 2",
        f"-> {out}/",
    ):
        assert any(fragment in line for line in lines), (fragment, err)
    code, err = analyze_cli(capsys, out, "--overwrite", "--quiet")
    assert code == 0 and err == ""
    path = tmp_path / "ckpt.pth"
    torch.save(_tiny_model().state_dict(), path)
    code, err = run(
        capsys,
        "analyze",
        "deit_tiny",
        "--ckpt",
        path,
        *TINY_ARGS,
        "--num-images",
        1,
        "--no-figures",
        "--out",
        tmp_path / "r2",
    )
    sha = __import__("hashlib").sha256(path.read_bytes()).hexdigest()[:12]
    assert code == 0 and f"checkpoint {path} (sha256 {sha}) loaded" in err


# 7. Image selection ---------------------------------------------------------------------------


def test_single_image_file_and_random_sample(tmp_path):
    from vitspec.inputs import bundled_images_dir, open_images

    one = bundled_images_dir() / "chelsea.jpg"
    assert [p.name for p in open_images(one).paths] == ["chelsea.jpg"]
    first = open_images(None, 4)
    rand = open_images(None, 4, sample="random", seed=3)
    again = open_images(None, 4, sample="random", seed=3)
    other = open_images(None, 4, sample="random", seed=4)
    assert rand.paths == again.paths and rand.paths != other.paths
    assert sorted(rand.paths) == sorted(first.paths)  # a permutation of the whole tree
    assert rand.paths[:4] != first.paths[:4]
    result = vitspec.analyze(
        "deit_tiny", random_init=True, model_kwargs=TINY, images=one, metrics="hc_dc_ratio"
    )
    assert result.info["images"]["files"] == ["chelsea.jpg"]
    result = vitspec.analyze(
        "deit_tiny",
        random_init=True,
        model_kwargs=TINY,
        num_images=3,
        sample="random",
        sample_seed=3,
        metrics="hc_dc_ratio",
    )
    expected = [p.name for p in rand.paths[:3]]
    assert result.info["images"]["files"] == expected
    assert result.info["images"]["sample"] == "random"


def test_sixteen_bit_images_are_scaled_not_clipped():
    from vitspec.inputs import to_rgb8

    ramp = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I")
    got = np.asarray(to_rgb8(img))[0, :, 0]
    assert got.tolist() == [0, 1, 128, 255]  # Pillow's own convert("RGB") gives 0, 255, 255, 255


# 8. Non-finite activations and verdicts -------------------------------------------------------


def _nan_model():
    model = timm.create_model("deit_tiny_patch16_224", **{**TINY, "depth": 4})
    with torch.no_grad():
        model.blocks[2].mlp.fc2.bias.fill_(float("nan"))  # block 3's output is the first NaN
    return model


@pytest.mark.parametrize("command", ["analyze", "verify"])
def test_first_non_finite_block_is_named(command):
    fn = getattr(vitspec, command)
    with pytest.raises(VitspecError, match=r"block 3 \(blocks\.2\)") as info:
        fn(_nan_model(), num_images=2)
    assert info.value.exit_code == 1


def test_verify_verdict_says_where_a_check_is_not_applicable():
    from vitspec.verification.result import VerifyResult, summarise

    df = pd.DataFrame(
        {
            "check": ["row_stochastic"] * 3,
            "layer": pd.array([1, 2, 3], dtype="Int64"),
            "head": pd.array([0, 0, 0], dtype="Int64"),
            "status": ["pass", "not-applicable", "not-applicable"],
            "cases": [4, 0, 0],
            "violations": [0, 0, 0],
            "max_slack": [0.1, np.nan, np.nan],
            "reason": ["", "rows do not sum to 1", "rows do not sum to 1"],
            "model": ["m"] * 3,
        }
    )
    result = VerifyResult(df, {"summary": summarise(df)})
    line = result.summary_lines()[0]
    assert "PASS (n/a at layers 2-3)" in line and "rows do not sum to 1" in line


# 9. Listing -----------------------------------------------------------------------------------


def test_metrics_listing(capsys):
    assert main(["metrics", "pre_*"]) == 0
    out = capsys.readouterr().out
    assert "pre_attn_entropy" in out and "pre_attn_spectrum" in out
    assert main(["metrics", "foo"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        "vitspec: no metric matches 'foo'; 'vitspec metrics' lists them all"
    )
