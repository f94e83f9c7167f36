"""The CLI as a user meets it: one command, one clear line per mistake, no half-written output."""

import json

import pytest
import timm
import torch
from PIL import Image

from vitspec.cli import COMMANDS, main
from vitspec.cli_parser import build_parser

MODEL = "deit_tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "deit_tiny_trained.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, expected_code, *fragments):
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vitspec: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_analyze_writes_a_complete_run_directory(capsys, tmp_path, ckpt):
    out = tmp_path / "run"
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--ckpt",
        str(ckpt),
        "--num-images",
        "2",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    for stem in ("tokens", "cosine", "attention_heads", "dlogamp", "attn_spectrum"):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names
    assert {"metrics.csv", "spectra.csv", "run.json"} <= set(names)
    info = json.loads((out / "run.json").read_text())
    assert info["checkpoint"] == "deit_tiny_trained.pth"
    assert info["weights"]["loaded_key"] == "model"
    assert len(info["weights"]["sha256"]) == 64
    assert info["images"]["used"] == 2 and info["images"]["source"] == "bundled"
    assert "analyze" in info["command"] or info["command"]
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header == "run,model,checkpoint,site,layer,depth,head,metric,mean,std,n"
    header = (out / "spectra.csv").read_text().splitlines()[0]
    assert header == "run,model,checkpoint,site,layer,head,curve,freq,mean,std,n"


def test_random_init_says_so_everywhere(capsys, tmp_path):
    out = tmp_path / "r"
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--random-init",
        "--num-images",
        "1",
        "--out",
        str(out),
        "--no-figures",
        "--metrics",
        "hc_dc_ratio",
    )
    assert code == 0, err
    assert "RANDOM initialisation" in err
    assert "random-init" in (out / "metrics.csv").read_text().splitlines()[1]
    assert json.loads((out / "run.json").read_text())["random_init"] is True


def test_default_out_dir_is_runs_model_label(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--random-init",
        "--num-images",
        "1",
        "--quiet",
        "--no-figures",
        "--metrics",
        "erank",
    )
    assert code == 0, err
    assert (tmp_path / "runs" / "deit_tiny-random-init" / "metrics.csv").is_file()


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["deit_smal", "--random-init"], ["unknown model 'deit_smal'", "deit_small"]),
        (["resnet18", "--random-init"], ["resnet18", "vision transformers"]),
        (
            ["deit_tiny", "--ckpt", "/nonexistent/x.pth"],
            ["checkpoint not found", "/nonexistent/x.pth"],
        ),
        (["deit_tiny"], ["--ckpt FILE", "--random-init"]),
        (
            ["deit_tiny", "--random-init", "--images", "/nonexistent/dir"],
            ["image folder or file not found"],
        ),
        (["deit_tiny", "--random-init", "--sites", "embed,blocks"], ["allowed: embed, mid, block"]),
        (["deit_tiny", "--random-init", "--metrics", "nope"], ["allowed:"]),
    ],
)
def test_user_mistakes_give_one_line(capsys, tmp_path, argv, fragments):
    out = tmp_path / "never"
    code, err = run(capsys, "analyze", *argv, "--out", str(out), "--quiet")
    assert_one_line_error(code, err, 2, *fragments)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_files_give_one_line(capsys, tmp_path, ckpt):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--random-init",
        "--images",
        str(empty),
        "--out",
        str(tmp_path / "o1"),
        "--quiet",
    )
    assert_one_line_error(code, err, 2, "no images", str(empty))

    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(ckpt.read_bytes()[:100_000])
    code, err = run(
        capsys, "analyze", MODEL, "--ckpt", str(truncated), "--out", str(tmp_path / "o2"), "--quiet"
    )
    assert_one_line_error(code, err, 2, "cannot read checkpoint", "cut.pth")

    code, err = run(
        capsys,
        "analyze",
        "vit_small",
        "--ckpt",
        str(ckpt),
        "--out",
        str(tmp_path / "o3"),
        "--quiet",
    )
    assert_one_line_error(code, err, 2, "vit_small_patch16_224")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_existing_out_dir_refused_before_any_work(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run(capsys, "analyze", MODEL, "--random-init", "--out", str(out))
    assert_one_line_error(code, err, 2, "exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--random-init",
        "--out",
        str(out),
        "--overwrite",
        "--num-images",
        "1",
        "--no-figures",
        "--quiet",
        "--metrics",
        "hc_energy",
    )
    # --overwrite replaces only vitspec's own output: a folder holding a user's file is kept
    assert_one_line_error(code, err, 2, "not a vitspec output", "keep.txt")
    assert (out / "keep.txt").read_text() == "mine" and not (out / "metrics.csv").exists()


def test_nan_checkpoint_names_the_layer(capsys, tmp_path):
    torch.manual_seed(0)
    sd = timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict()
    sd["blocks.4.attn.qkv.weight"][:] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--ckpt",
        str(path),
        "--num-images",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    )
    assert_one_line_error(code, err, 1, "NaN or Inf", "block 5 (blocks.4)")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_absent(capsys, tmp_path):
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--random-init",
        "--device",
        "cuda",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    )
    assert_one_line_error(code, err, 2, "CUDA is not available")


def test_debug_shows_the_traceback(tmp_path):
    from vitspec.errors import VitspecError

    with pytest.raises(VitspecError):
        main(["analyze", "deit_smal", "--random-init", "--debug", "--out", str(tmp_path / "o")])


def test_unreadable_image_is_skipped_and_recorded(capsys, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "a.png")
    Image.new("L", (30, 40), 99).save(images / "b.jpg")
    (images / "c.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    code, err = run(
        capsys,
        "analyze",
        MODEL,
        "--random-init",
        "--images",
        str(images),
        "--out",
        str(out),
        "--no-figures",
        "--metrics",
        "hc_energy",
    )
    assert code == 0, err
    assert sum("skipping unreadable image c.jpg" in line for line in err.splitlines()) == 1
    info = json.loads((out / "run.json").read_text())
    assert info["images"]["used"] == 2
    assert [s["path"] for s in info["images"]["skipped"]] == ["c.jpg"]


def test_every_subcommand_has_its_command_function():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert set(sub.choices) == set(COMMANDS)
