"""Cost of vitspec against plain fused timm inference of the same model, batch and threads.

The default run (a few minutes on 2 cores) prints four lines:

    analyze/inference time ratio [deit_small_patch16_224, N=197]: X.XX
    analyze/inference time ratio [vit_small_patch14_dinov2, N=1370]: X.XX
    verify/inference time ratio [vit_small_patch14_dinov2, N=1370]: X.XX
    peak RSS of analyze [deit_small_patch16_224]: 32 images A MiB, 512 images B MiB (ratio X.XXX)

Each ratio is measured in one process: plain inference (timm's default fused attention, no
hooks) and the vitspec call run alternately on the same synthetic images, batch size and torch
thread count, ``--repeats`` times; the median of the per-pair ratios is printed (pairs, because
the machine may be shared). Weights are random-init (``pretrained=False``): the cost does not
depend on the weights' values, only on shapes. Both run with PyTorch's transparent-huge-page
CPU allocator (``THP_MEM_ALLOC_ENABLE=1``, as the vitspec command sets it). Peak memory is
measured in fresh subprocesses (peak RSS on CPU, peak allocated on CUDA). Details (machine,
timings) go to stderr.

    python benchmarks/throughput.py                  # the four lines
    python benchmarks/throughput.py --only deit      # one of deit, dinov2, verify, memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the vitspec command line does

import timm  # noqa: E402
import torch  # noqa: E402

import vitspec  # noqa: E402
from vitspec.inputs import synthetic_batches

# name, native input size, tokens, batch size, images
DEIT = ("deit_small_patch16_224", 224, 197, 16, 32)
DINOV2 = ("vit_small_patch14_dinov2", 518, 1370, 1, 2)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _model(name: str, device: torch.device):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval().to(device)


def _inference(model, batches, device) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(batch.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _analyze(model, batches, device) -> float:
    start = time.perf_counter()
    vitspec.analyze(model, images=batches, device=device.type, warn=lambda m: None)
    return time.perf_counter() - start


def _verify(model, batches, device) -> float:
    start = time.perf_counter()
    vitspec.verify(model, images=batches, device=device.type, warn=lambda m: None)
    return time.perf_counter() - start


def ratio(config, call, device, repeats: int) -> float:
    """Median over ``repeats`` of (vitspec call time) / (plain inference time), in pairs."""
    name, size, _, batch, n = config
    model = _model(name, device)
    batches = list(synthetic_batches(n, batch, (size, size), seed=0))
    _inference(model, batches[:1], device)  # warm up both paths
    if call is _analyze:
        call(model, batches[:1], device)
    ratios = []
    for _ in range(repeats):
        plain = _inference(model, batches, device)
        ours = call(model, batches, device)
        ratios.append(ours / plain)
        _log(f"  {name} {call.__name__[1:]}: {ours:.2f} s, inference {plain:.2f} s")
    return statistics.median(ratios)


def peak_memory(device: str, n: int) -> float:
    """Peak memory (MiB) of analyzing ``n`` synthetic DeiT-S images, in a fresh process."""
    cmd = [sys.executable, __file__, "--device", device, "--_memory-child", str(n)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def memory_child(device: str, n: int) -> None:
    name, size, _, batch, _ = DEIT
    dev = torch.device(device)
    model = _model(name, dev)
    vitspec.analyze(
        model,
        images=synthetic_batches(n, batch, (size, size), seed=0),
        device=device,
        warn=lambda m: None,
    )
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", choices=["deit", "dinov2", "verify", "memory"])
    parser.add_argument("--_memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        memory_child(args.device, args._memory_child)
        return
    device = torch.device(args.device)
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    _log(
        f"device {device} ({where}), threads {torch.get_num_threads()}, torch "
        f"{torch.__version__}, timm {timm.__version__}, vitspec {vitspec.__version__}; "
        "random-init weights (the cost depends on shapes, not on the weights' values)"
    )
    todo = [args.only] if args.only else ["deit", "dinov2", "verify", "memory"]
    if "deit" in todo:
        r = ratio(DEIT, _analyze, device, args.repeats)
        print(f"analyze/inference time ratio [{DEIT[0]}, N={DEIT[2]}]: {r:.2f}", flush=True)
    if "dinov2" in todo:
        r = ratio(DINOV2, _analyze, device, args.repeats)
        print(f"analyze/inference time ratio [{DINOV2[0]}, N={DINOV2[2]}]: {r:.2f}", flush=True)
    if "verify" in todo:
        r = ratio(DINOV2, _verify, device, 1)
        print(f"verify/inference time ratio [{DINOV2[0]}, N={DINOV2[2]}]: {r:.2f}", flush=True)
    if "memory" in todo:
        small, large = peak_memory(args.device, 32), peak_memory(args.device, 512)
        kind = "peak CUDA allocated" if device.type == "cuda" else "peak RSS"
        print(
            f"{kind} of analyze [{DEIT[0]}]: 32 images {small:.0f} MiB, 512 images "
            f"{large:.0f} MiB (ratio {large / small:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
