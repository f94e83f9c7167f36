"""Timing and accuracy of candidate methods for ``attn_hc_gain`` (not a test).

Prints, for one attention batch of B=16 images, H=6 heads, N=197 tokens (DeiT-S at 224): the time
of each method and its max relative error against float64 SVD over several inputs (random-init
DeiT-S attention at three depths; softmax(a * randn) for a in {0.1, 1, 3, 10}; a mixture of
those scales), plus the DeiT-S forward time for the same batch and the per-layer cost of the
other metrics, for comparison.

Usage: .venv/bin/python benchmarks/hc_gain_methods.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import vitspec.functional as F
from vitspec.functional.attention import double_centre

B, H, N = 16, 6, 197


def timed(fn, repeats: int, device: str) -> float:
    """Median wall time of ``fn()`` in ms (one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def deit_small_attention(device: str, repeats: int):
    """Random-init DeiT-S attention [12, B, H, N, N] (float32) and the forward time in ms."""
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval().to(device)
    images = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        forward_ms = timed(lambda: model(images), repeats, device)
        maps, handles = [], []
        for blk in model.blocks:
            blk.attn.fused_attn = False
            handles.append(
                blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(i[0]))
            )
        try:
            model(images)
        finally:
            for h in handles:
                h.remove()
    return torch.stack(maps), forward_ms


def power_iteration(attn: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Plain power iteration on the float32 Gram matrix (shown for its slow convergence)."""
    m = double_centre(attn).float()
    g = m.mT @ m
    v = torch.ones(*m.shape[:-1], 1, device=m.device) + torch.linspace(0, 1, m.shape[-1])[
        :, None
    ].to(m.device)
    for _ in range(iters):
        v = g @ v
        v = v / v.norm(dim=-2, keepdim=True)
    return (m @ v).double().norm(dim=(-2, -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dev = args.device
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}")

    deit, forward_ms = deit_small_attention(dev, args.repeats)
    g = torch.Generator().manual_seed(1)
    inputs = {f"deit_s random-init layer {i + 1}": deit[i] for i in (0, 5, 11)}
    for a in (0.1, 1.0, 3.0, 10.0):
        inputs[f"softmax({a} * randn)"] = torch.softmax(
            a * torch.randn(B, H, N, N, generator=g), -1
        )
    scales = torch.tensor([0.1, 1.0, 3.0, 10.0]).repeat(B // 4)[:, None, None, None]
    inputs["mixture of scales"] = torch.softmax(scales * torch.randn(B, H, N, N, generator=g), -1)
    inputs = {k: v.to(dev).float().contiguous() for k, v in inputs.items()}

    methods = {
        "svdvals float64": lambda a: torch.linalg.svdvals(double_centre(a.double()))[..., 0],
        "svdvals float32": lambda a: torch.linalg.svdvals(double_centre(a))[..., 0],
        "eigvalsh Gram float64": lambda a: _eig_top(double_centre(a.double())),
        "eigvalsh Gram float32": lambda a: _eig_top(double_centre(a)),
        "power iteration, 50 it, f32": power_iteration,
        "attn_hc_gain (Lanczos, f32)": F.attn_hc_gain,
    }
    refs = {k: F.hc_gain_exact(a) for k, a in inputs.items()}
    timing_input = inputs["deit_s random-init layer 6"]
    print(f"\nattn_hc_gain methods, one [B={B}, H={H}, N={N}] batch (float32 attention in):")
    print(f"{'method':32s} {'time ms':>9s} {'max rel err':>12s}  worst input")
    for name, fn in methods.items():
        ms = timed(lambda fn=fn: fn(timing_input), args.repeats, dev)
        errs = {
            k: ((fn(a).double() - refs[k]).abs() / refs[k]).max().item() for k, a in inputs.items()
        }
        worst = max(errs, key=errs.get)
        print(f"{name:32s} {ms:9.1f} {errs[worst]:12.2e}  {worst}")
    print("\nLanczos time per input (ms):")
    for k, a in inputs.items():
        print(f"  {k:32s} {timed(lambda a=a: F.attn_hc_gain(a), args.repeats, dev):7.1f}")

    print(f"\nDeiT-S forward, B={B} at 224: {forward_ms:.1f} ms (x12 layers below for comparison)")
    tokens = torch.randn(B, N, 384, generator=g).to(dev)
    print("per-layer cost of each metric (ms):")
    for name in ("attn_entropy", "attn_cos", "attn_cross_layer_sim", "attn_spectrum"):
        fn = getattr(F, name)
        print(
            f"  {name:22s} {timed(lambda fn=fn: fn(timing_input, deit[4]), args.repeats, dev):7.1f}"
        )
    for name in (
        "hc_dc_ratio",
        "hc_energy",
        "patch_cos_abs",
        "patch_cos",
        "rank_residual",
        "feat_var",
        "dlogamp",
        "erank",
        "token_spectrum",
    ):
        fn = getattr(F, name)
        print(
            f"  {name:22s} {timed(lambda fn=fn: fn(tokens, 1, (14, 14)), args.repeats, dev):7.1f}"
        )


def _eig_top(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(m.mT @ m)[..., -1].clamp_min(0).double().sqrt()


if __name__ == "__main__":
    main()
