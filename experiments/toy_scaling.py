"""Toy demonstration: baseline vs +AttnScale vs +FeatScale, trained from scratch on CPU in minutes.

A small, honest check of what ``vitspec compare`` shows, not a reproduction of Wang et al. (2022):
12-block, 64-wide ViTs (timm ``vit_tiny_patch16_224`` shrunk: 32x32 inputs, 8x8 patches, a 4x4
grid of 16 patch tokens + a class token, 4 heads, 0.61 M parameters) are trained on scikit-learn's
``digits`` (1797 8x8 grey images of handwritten digits, 10 classes, shipped inside scikit-learn),
upscaled bilinearly to 32x32 and repeated to 3 channels, with a fixed stratified 1347/450
train/test split (seed 0). For each seed the three models start from the same initial weights
(the techniques add zero-initialised scales only, so the shared parameters are identical), see the
same batches and augmentations, and train with the same AdamW budget:

- ``baseline``: the plain ViT;
- ``attnscale``: ``vitspec.scaling.add_attnscale`` (a learnable HC gain per head and block);
- ``featscale``: ``vitspec.scaling.add_featscale(doubled=False)``, the single form of the paper's
  equation and of the authors' CaiT/Swin code, natural for a fresh model (the authors' DeiT code
  adds the terms twice, ``doubled=True``).

Each trained model is then measured with ``vitspec.analyze`` on the 450 test images and the three
runs are overlaid with ``vitspec.compare``. Outputs: checkpoints in ``runs/toy_scaling/`` (git
ignored), run directories of the first seed in ``reports/toy_scaling/<name>/`` (other seeds in
``runs/toy_scaling/seed<k>/``), the comparison in ``reports/toy_scaling/compare/`` and a summary
(accuracy, learned scales, wall times) in ``reports/toy_scaling/results.json``.

Run (about 4 minutes per seed on 2 unshared CPU cores; 3 seeds: about 12 minutes)::

    pip install -e .[experiments]
    python experiments/toy_scaling.py                 # one seed
    python experiments/toy_scaling.py --seeds 0 1 2   # mean +/- sd over seeds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitspec
from vitspec.reporting import draw
from vitspec.scaling import add_attnscale, add_featscale, techniques

VARIANTS = ("baseline", "attnscale", "featscale")
ARCH = dict(img_size=32, patch_size=8, depth=12, embed_dim=64, num_heads=4, num_classes=10)
MEAN, STD = 0.5, 0.5  # pixel values in [0, 1] -> [-1, 1]


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as (x_train [1347, 8, 8], y_train, x_test [450, 8, 8], y_test)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # the one optional dependency of this script
        raise SystemExit(
            "this experiment needs scikit-learn: pip install -e .[experiments]"
        ) from err
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.images, digits.target, test_size=450, stratify=digits.target, random_state=seed
    )
    return x_tr, y_tr, x_te, y_te


def upscale(images: np.ndarray, size: int = 32) -> torch.Tensor:
    """8x8 grey digits with values 0..16 -> normalised ``[n, 3, size, size]`` float32 (bilinear)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - MEAN) / STD).repeat(1, 3, 1, 1).contiguous()


def make_model(variant: str, seed: int, **arch) -> nn.Module:
    """The seed's initial ViT, with the variant's technique added (zero scales: same function)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**ARCH, **arch})
    if variant == "attnscale":
        add_attnscale(model)
    elif variant == "featscale":
        add_featscale(model, doubled=False)
    return model


def shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero-padded background = -1 after norm)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters (biases, norms, the techniques' scales) and tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    pad: int = 3,
    log=print,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the mean training loss per epoch."""
    generator = torch.Generator().manual_seed(seed)  # same batches and shifts for every variant
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, warmup = epochs * steps_per_epoch, max(1, int(warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total - warmup))))
        ),
    )
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        running = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(shift(x[idx], pad, generator)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        losses.append(running / len(x))
        log(f"  epoch {epoch + 1:2d}/{epochs}: train loss {losses[-1]:.4f}")
    return losses


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 150) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def learned_scales(model: nn.Module) -> dict:
    """Mean |lamb| of each technique's scales after training (0 at initialisation)."""
    out = {}
    for key, suffix in (
        ("attn_lamb", "attn.lamb"),
        ("feat_lamb1_dc", "lamb1"),
        ("feat_lamb2_hc", "lamb2"),
    ):
        values = [
            p.detach().abs().mean().item()
            for n, p in model.named_parameters()
            if n.endswith(suffix)
        ]
        if values:
            out[key] = {"mean_abs": float(np.mean(values)), "max_block_mean_abs": max(values)}
    return out


def run_seed(seed: int, data, args, log) -> dict:
    x_tr, y_tr, x_te, y_te = data
    first = seed == args.seeds[0]
    run_root = Path(args.out) if first else Path(args.runs) / f"seed{seed}"
    rows, dirs = {}, []
    for variant in VARIANTS:
        log(f"seed {seed}, {variant}:")
        model = make_model(variant, seed)
        start = time.perf_counter()
        losses = train(model, x_tr, y_tr, epochs=args.epochs, seed=seed, log=log)
        train_s = time.perf_counter() - start
        acc = accuracy(model, x_te, y_te)
        ckpt = Path(args.runs) / f"seed{seed}" / f"{variant}.pth"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "variant": variant,
                "seed": seed,
                "arch": ARCH,
                "techniques": techniques(model),
            },
            ckpt,
        )
        start = time.perf_counter()
        batches = list(x_te.split(50))
        result = vitspec.analyze(
            model.eval(), images=batches, device="cpu", label=variant, warn=log
        )
        result.info["toy_scaling"] = {
            "variant": variant,
            "seed": seed,
            "checkpoint": str(ckpt),
            "test_accuracy": acc,
            "techniques": techniques(model),
        }
        run_dir = result.save(run_root / variant, overwrite=True)
        analyze_s = time.perf_counter() - start
        dirs.append(run_dir)
        rows[variant] = {
            "test_accuracy": acc,
            "final_train_loss": losses[-1],
            "train_losses": losses,
            "train_s": round(train_s, 1),
            "analyze_s": round(analyze_s, 1),
            "techniques": techniques(model),
            "learned_scales": learned_scales(model),
        }
        log(f"  test accuracy {acc:.4f} ({train_s:.0f} s training, {analyze_s:.0f} s analysis)")
    out = Path(args.out) / "compare" if first else run_root / "compare"
    comparison = vitspec.compare(dirs, out, labels=list(VARIANTS), overwrite=True)
    draw(out)  # compare.png / .pdf from the saved folder
    d = comparison.differences
    cos = d[d["metric"] == "patch_cos_abs"]
    for run, group in cos.groupby("run"):
        rows[run]["patch_cos_abs_diff_mean_over_layers"] = float(group["diff"].mean())
        rows[run]["patch_cos_abs_diff_last_layer"] = float(
            group.loc[group["layer"] == ARCH["depth"], "diff"].iloc[0]
        )
        rows[run]["patch_cos_abs_layers_lower_than_baseline"] = int((group["sign"] == "-").sum())
    for variant, table in ((v, comparison.table) for v in VARIANTS):
        cos = table[(table["run"] == variant) & (table["metric"] == "patch_cos_abs")]
        rows[variant]["patch_cos_abs_by_layer"] = cos.sort_values("layer")["mean"].round(5).tolist()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="reports/toy_scaling")
    parser.add_argument("--runs", default="runs/toy_scaling", help="checkpoints (git ignored)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    wall, cpu, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    data = (upscale(x_tr), torch.as_tensor(y_tr), upscale(x_te), torch.as_tensor(y_te))
    per_seed = {}
    for seed in args.seeds:
        start = time.perf_counter()
        per_seed[seed] = run_seed(seed, data, args, log)
        per_seed[seed]["wall_s"] = round(time.perf_counter() - start, 1)
        log(f"seed {seed}: {per_seed[seed]['wall_s']} s for the three runs")
    summary = {}
    for variant in VARIANTS:
        accs = [per_seed[s][variant]["test_accuracy"] for s in args.seeds]
        summary[variant] = {
            "test_accuracy_mean": float(np.mean(accs)),
            "test_accuracy_sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
            "n_seeds": len(accs),
        }
        if variant != "baseline":
            diffs = [
                per_seed[s][variant]["patch_cos_abs_diff_mean_over_layers"] for s in args.seeds
            ]
            summary[variant]["patch_cos_abs_diff_mean_over_layers_by_seed"] = diffs
    report = {
        "what": "baseline vs +AttnScale vs +FeatScale (single form) on sklearn digits, 32x32",
        "arch": {"timm": "vit_tiny_patch16_224", **ARCH},
        "data": {"train": len(y_tr), "test": len(y_te), "split_seed": 0, "upscale": "bilinear"},
        "epochs": args.epochs,
        "batch_size": 32,
        "optimizer": "AdamW lr 1e-3 wd 0.05, cosine",
        "seeds": args.seeds,
        "summary": summary,
        "per_seed": per_seed,
        "wall_s": round(time.perf_counter() - wall, 1),
        "process_cpu_s": round(time.process_time() - cpu, 1),
        "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "vitspec": vitspec.__version__,
        "command": " ".join(sys.argv),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    for variant, s in summary.items():
        sd = f" +/- {s['test_accuracy_sd']:.4f}" if s["test_accuracy_sd"] is not None else ""
        log(f"{variant:10s} test accuracy {s['test_accuracy_mean']:.4f}{sd} ({s['n_seeds']} seeds)")
    log(f"total wall time {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
