"""Throughput and memory of ``vitspec.analyze`` against plain timm inference, in one process.

(a) plain timm inference of the model with its default (fused) attention, (b) ``vitspec.analyze``
with the default metric suite, on the same synthetic images, batch size and thread count. Each is
timed ``--repeats`` times, interleaved, and the fastest run of each is kept. Peak memory of analyze
for 32 vs 512 images is measured in fresh subprocesses (peak RSS on CPU, peak allocated on CUDA).

    python benchmarks/throughput.py --model deit_small --batch-size 16 --num-images 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import timm
import torch

import vitspec
from vitspec.inputs import synthetic_batches


def _batches(args, n):
    return list(synthetic_batches(n, args.batch_size, (224, 224), seed=0))


def time_inference(model, batches, device) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(batch.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_analyze(model, batches, device, pipeline: bool = True) -> float:
    start = time.perf_counter()
    vitspec.analyze(
        model, images=batches, device=device.type, warn=lambda m: None, pipeline=pipeline
    )
    return time.perf_counter() - start


def peak_memory(args, n: int) -> float:
    """Peak memory (MiB) of analyzing n synthetic images, in a fresh process."""
    cmd = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--_memory-child",
        str(n),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def memory_child(args) -> None:
    device = torch.device(args.device)
    model = timm.create_model(timm_name(args.model), pretrained=False).eval().to(device)
    batches = synthetic_batches(args._memory_child, args.batch_size, (224, 224), seed=0)
    vitspec.analyze(model, images=batches, device=args.device, warn=lambda m: None)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak}))


def timm_name(name: str) -> str:
    from vitspec.loading import resolve_model_name

    return resolve_model_name(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--inline", action="store_true", help="also time analyze(pipeline=False)")
    parser.add_argument("--_memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        memory_child(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(timm_name(args.model), pretrained=False).eval().to(device)
    batches = _batches(args, args.num_images)
    cpu = platform.processor() or platform.machine()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu}"
    print(
        f"model {args.model}, batch {args.batch_size}, {args.num_images} images, "
        f"device {device} ({where}), threads {torch.get_num_threads()}, torch {torch.__version__}"
    )
    time_inference(model, batches[:1], device)  # warm up both paths
    time_analyze(model, batches[:1], device)
    plain, ours, inline = [], [], []
    for _ in range(args.repeats):
        plain.append(time_inference(model, batches, device))
        ours.append(time_analyze(model, batches, device))
        if args.inline:
            inline.append(time_analyze(model, batches, device, pipeline=False))
    a, b = min(plain), min(ours)
    print(f"(a) timm inference, fused attention: {args.num_images / a:8.2f} img/s ({a:.2f} s)")
    print(f"(b) vitspec.analyze, all metrics:    {args.num_images / b:8.2f} img/s ({b:.2f} s)")
    if inline:
        c = min(inline)
        print(f"    the same without the worker thread: {args.num_images / c:.2f} img/s "
              f"(ratio {c / a:.2f})")
    if not args.skip_memory:
        small, large = peak_memory(args, 32), peak_memory(args, 512)
        kind = "peak CUDA allocated" if device.type == "cuda" else "peak RSS"
        print(
            f"{kind} of analyze: 32 images {small:.0f} MiB, 512 images {large:.0f} MiB "
            f"(ratio {large / small:.3f})"
        )
    print(f"analyze/inference time ratio: {b / a:.2f}")


if __name__ == "__main__":
    main()
