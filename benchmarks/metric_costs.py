"""What each metric costs, as a share of the model's own forward pass (not a test).

For one batch (DeiT-S at 224: 16 images, N = 197; DINOv2-S at 518: 1 image, N = 1370) on one
CPU thread, as each of ``analyze``'s data-parallel workers runs it, prints:

- the forward pass with timm's fused attention (the benchmark's baseline), and with vitspec's
  hooks on the default sites (``embed``, ``block``, ``attn``) that need the attention matrix;
- every default metric's *marginal* cost in the collector's order, where metrics share their
  views' intermediates (the first metric that needs e.g. the HC Gram pays for it), each the
  fastest of ``--repeats`` runs, in ms and as a fraction of the fused forward pass.

CPU time of this thread (``time.thread_time``), so a shared machine disturbs it less than wall
time. Random-init weights: the cost depends on the shapes, except ``attn_hc_gain``, whose
Lanczos iterations take longer on the near-uniform maps of untrained models (clustered top
singular values) than on trained attention.

    python benchmarks/metric_costs.py                 # both models
    python benchmarks/metric_costs.py --only dinov2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections import defaultdict

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the vitspec command line does

import timm  # noqa: E402
import torch  # noqa: E402

from vitspec.adapters import get_adapter  # noqa: E402
from vitspec.capture import capture  # noqa: E402
from vitspec.collect import Collector  # noqa: E402
from vitspec.engine import BatchInfo  # noqa: E402
from vitspec.inputs import synthetic_batches  # noqa: E402
from vitspec.metrics import list_metrics  # noqa: E402

MODELS = {  # name, input size, batch
    "deit": ("deit_small_patch16_224", 224, 16),
    "dinov2": ("vit_small_patch14_dinov2", 518, 1),
}
SITES = ("embed", "block")
HOOKED = {"pattern", "resid_pre", "resid_post"}


def fastest(fn, repeats: int) -> float:
    """Least CPU time of ``fn()`` over ``repeats`` calls, in seconds (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def costs(key: str, repeats: int) -> None:
    name, size, batch = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    images = next(iter(synthetic_batches(batch, batch, (size, size), seed=0)))
    adapter = get_adapter(model)

    def forward(emit=None):
        with torch.inference_mode():
            if emit is None:
                model(images)
                return
            with capture(adapter, HOOKED, emit):
                model(images)

    fused = fastest(forward, repeats)
    hooked = fastest(lambda: forward(lambda *_: None), repeats)
    held = []
    forward(lambda site, layer, x: held.append((site, layer, x.clone())))

    spent: dict[str, float] = defaultdict(float)

    def timed(spec):
        def fn(*args):
            start = time.thread_time()
            out = spec.fn(*args)
            spent[spec.name] += time.thread_time() - start
            return out

        return dataclasses.replace(spec, fn=fn)

    specs = [timed(s) for s in list_metrics() if s.default]
    geometry = adapter.geometry((size, size))
    best: dict[str, float] = {}
    for _ in range(repeats):
        spent.clear()
        collector = Collector(specs, SITES)
        with torch.inference_mode():
            collector.start_batch(BatchInfo(0, batch, (size, size), geometry, {}))
            for site, layer, x in held:
                collector.on(site, layer, x)
        for metric, seconds in spent.items():
            best[metric] = min(best.get(metric, float("inf")), seconds)

    n = held[[s for s, _, _ in held].index("pattern")][2].shape[-1]
    print(f"{name}, {batch} image(s), N={n}, 1 thread (CPU time; fraction of the fused forward)")
    print(f"  {'forward, fused attention':34s} {1e3 * fused:8.1f} ms  1.000")
    hooks = "forward, hooked (unfused attention)"
    print(f"  {hooks:34s} {1e3 * hooked:8.1f} ms  {hooked / fused:.3f}")
    total = 0.0
    for metric, seconds in sorted(best.items(), key=lambda kv: -kv[1]):
        total += seconds
        print(f"  {metric:34s} {1e3 * seconds:8.1f} ms  {seconds / fused:.3f}")
    print(f"  {'metrics, total':34s} {1e3 * total:8.1f} ms  {total / fused:.3f}")
    print(f"  {'estimated analyze/inference ratio':34s} {'':11s}  {(hooked + total) / fused:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=sorted(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for key in [args.only] if args.only else list(MODELS):
        costs(key, args.repeats)


if __name__ == "__main__":
    main()
