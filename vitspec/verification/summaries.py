"""The verifier's fixed-size sums -> the small tables its figures are drawn from."""

from __future__ import annotations

import math

from torch import Tensor


def figure_data(
    sums: dict[str, Tensor], depth: int, curve_layers: list[int], max_steps: int
) -> dict[str, list[dict]]:
    """Small tables for the figures (means over images) from a verifier's sums.

    Example:
        >>> figure_data({}, depth=2, curve_layers=[1, 2], max_steps=4)["gains"]
        []
    """
    out: dict[str, list[dict]] = {"gains": [], "curves": [], "products": [], "blocks": []}
    if "gains" in sums:
        n = sums["gains_n"]
        low = sums.get("lowpass")
        for layer in range(1, depth + 1):
            if n[layer] == 0:
                continue
            heads = int(sums["heads"][layer]) if "heads" in sums else sums["gains"].shape[1]
            for h in range(heads):
                g = sums["gains"][layer, h] / n[layer]
                row = {
                    "layer": layer,
                    "head": h,
                    "s_a": g[0].item(),
                    "s_a_max": sums["gains_max"][layer, h].item(),
                    "norm": g[1].item(),
                    "logit_bound": g[2].item(),
                    "a": g[3].item(),
                }
                if low is not None and sums["lowpass_n"][layer] > 0:
                    lw = low[layer, h]
                    row.update(
                        decay_rate=(lw[0] / lw[1]).item() if lw[1] > 0 else math.nan,
                        steps=(lw[2] / sums["lowpass_n"][layer]).item(),
                        converged=(lw[3] / sums["lowpass_n"][layer]).item(),
                    )
                out["gains"].append(row)
    if "curves" in sums:
        for layer in curve_layers:
            lr, lb, cnt = sums["curves"][layer]
            for h in range(lr.shape[0]):
                full = cnt[h, 0]
                if full == 0:
                    continue
                for t in range(max_steps):
                    if cnt[h, t] < full:
                        break
                    out["curves"].append(
                        {
                            "layer": layer,
                            "head": h,
                            "t": t + 1,
                            "r": 10 ** (lr[h, t] / full).item(),
                            "bound": 10 ** (lb[h, t] / full).item(),
                        }
                    )
    if "products" in sums:
        for layer in range(1, depth + 1):
            m = sums["products_n"][layer]
            if m > 0:
                v = (sums["products"][layer] / m).tolist()
                out["products"].append(
                    {
                        "layer": layer,
                        "r_same": 10 ** v[0],
                        "bound_same": 10 ** v[1],
                        "r_random": 10 ** v[2],
                        "bound_random": 10 ** v[3],
                    }
                )
    if "blocks" in sums:
        for layer in range(1, depth + 1):
            m = sums["blocks_n"][layer]
            if m > 0:
                v = (sums["blocks"][layer] / m).tolist()
                mx = sums["blocks_max"][layer].tolist()
                out["blocks"].append(
                    {
                        "layer": layer,
                        "gain": v[0],
                        "gain_max": mx[0],
                        "bound": v[1],
                        "rate": v[2],
                        "rate_max": mx[1],
                        "rate_bound": v[3],
                        "one_plus_bound": v[4],
                        "hc_y_over_hc_x": v[5],
                    }
                )
    return out
