"""Streaming the checks over a model's real attention, block inputs and attention branches.

A :class:`ModelVerifier` is the theory checker's run consumer: it collects a block's input, its
attention input, pattern and branch output as the forward pass produces them and runs the checks of
:class:`~vitspec.verification.blockchecks.BlockChecks` when the block returns. Its state (tallies,
figure sums, reasons) is fixed-size and mergeable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitspec.sites import ATTN_IN, ATTN_OUT, PATTERN, RESID_POST, RESID_PRE
from vitspec.verification.blockchecks import BlockChecks
from vitspec.verification.summaries import figure_data


class ModelVerifier(BlockChecks):
    """Per-(check, layer, head) tallies and figure summaries for one model run.

    Args:
        adapter: the model's adapter.
        device: where the float64 checks run (the forward pass's device).
        max_steps: T of lowpass_limit.
        seed: seeds the random start vectors, constants and head paths.
    """

    # ---- consumer protocol ------------------------------------------------------------------
    sites = frozenset({RESID_PRE, RESID_POST, ATTN_IN, ATTN_OUT, PATTERN})
    _PARTS = {RESID_PRE: "x", ATTN_IN: "input", ATTN_OUT: "output", PATTERN: "attn"}

    def start_batch(self, info=None) -> None:
        # seeded by the run's batch index, so a batch gets the same test vectors on any thread
        index = self.batch if info is None else info.index
        self._held.clear()
        self._paths = None
        self._gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        self.batch += 1

    def spawn(self) -> ModelVerifier:
        """An empty verifier with this one's options, for another thread of the same run."""
        return ModelVerifier(self.adapter, self.device, max_steps=self.max_steps, seed=self.seed)

    def on(self, site: str, layer: int, x: Tensor) -> None:
        if site == RESID_POST:
            self._process(layer)
        elif site == PATTERN and x.dim() in (4, 5) and x.shape[-1] == x.shape[-2]:
            # windowed [B, nW, H, n, n]: every window is one matrix of the per-head checks
            self._held["attn"] = x.flatten(0, 1) if x.dim() == 5 else x
            self._held["windows"] = x.shape[1] if x.dim() == 5 else 0
        elif site == PATTERN:
            self.shapes.setdefault(
                layer,
                (
                    f"the attention at layer {layer} has shape {tuple(x.shape)}, not [B, H, N, N]: "
                    "the checks are stated for one square softmax matrix per head"
                ),
            )
        else:
            self._held[self._PARTS[site]] = x

    def state(self) -> dict:
        """Fixed-size state: tallies, figure sums and what was not applicable."""
        return {
            "tallies": self.tallies,
            "sums": self._sums,
            "premise_failed": self.premise_failed,
            "missing": self.missing,
            "naive": self.naive,
            "gain_diff": self.gain_diff,
            "shapes": self.shapes,
            "partial": self.partial,
            "layer_heads": self.layer_heads,
            "num_heads": self.num_heads,
            "n_tokens": self.n_tokens,
        }

    def merge_state(self, other: dict) -> None:
        """Fold another verifier's :meth:`state` in (counts add, maxima take the larger)."""
        self.tallies.merge(other["tallies"])
        for key, value in other["sums"].items():
            # a fresh tensor: the sums may be inference tensors of a worker thread
            mine = self._slot(key, tuple(value.shape)).clone()
            part = tuple(map(slice, value.shape))
            if key.endswith("_max") or key == "heads":
                mine[part] = torch.maximum(mine[part], value)
            else:
                mine[part] = mine[part] + value
            self._sums[key] = mine
        for layer, (cases, exceed) in other["naive"].items():
            mine = self.naive.setdefault(layer, [0, 0])
            mine[0], mine[1] = mine[0] + cases, mine[1] + exceed
        for layer, parts in other["missing"].items():
            self.missing.setdefault(layer, set()).update(parts)
        for name in ("premise_failed", "shapes", "partial"):
            for layer, why in other[name].items():
                getattr(self, name).setdefault(layer, why)
        self.layer_heads.update(other["layer_heads"])
        self.gain_diff = max(self.gain_diff, other["gain_diff"])
        self.num_heads = max(self.num_heads, other["num_heads"])
        self.n_tokens = max(self.n_tokens, other["n_tokens"])

    # ---- results ---------------------------------------------------------------------------
    def not_applicable(self) -> dict[tuple, str]:
        """``(check, layer, head) -> reason`` for every row that is not applicable."""
        na: dict[tuple, str] = {}
        per_head = (
            "dc_passthrough",
            "hc_contraction",
            "lowpass_limit",
            "logit_bound",
            "attnscale_gain",
        )
        first_fail = min(self.premise_failed, default=None)
        for layer in range(1, self.depth + 1):
            if not any(k[1] == layer for k in self.tallies):
                continue  # no attention reached this block (e.g. a refused tap)
            heads = list(range(self.layer_heads.get(layer, self.num_heads)))
            reason = self.premise_failed.get(layer)
            if reason:
                for check in per_head:
                    na.update({(check, layer, h): reason for h in heads})
                for check in ("msa_bound", "msa_residual", "msa_reconstruction"):
                    na[(check, layer, None)] = reason
            if first_fail is not None and layer >= first_fail:
                why = reason or (
                    f"the head paths pass through layer {first_fail}, where "
                    f"{self.premise_failed[first_fail]}"
                )
                na.update({("product_lowpass", layer, h): why for h in [*heads, -1]})
            if reason:
                continue
            partial = self.partial.get(layer)
            if partial is not None:  # the product paths stop here (or never start)
                for later in range(layer, self.depth + 1):
                    if any(k[:2] == ("product_lowpass", later) for k in self.tallies):
                        continue
                    later_heads = range(self.layer_heads.get(later, len(heads)))
                    na.update({("product_lowpass", later, h): partial for h in [*later_heads, -1]})
            msa_reason = self._msa_reason(layer)
            if msa_reason:
                for check in ("msa_bound", "msa_residual", "msa_reconstruction"):
                    na[(check, layer, None)] = msa_reason
            elif "output" in self.missing.get(layer, ()):
                na[("msa_reconstruction", layer, None)] = (
                    "the attention branch output is not reachable for this block family"
                )
        return na

    def _msa_reason(self, layer: int) -> str | None:
        if layer in self.partial and "window" in self.partial[layer]:
            return self.partial[layer]
        w = self.weights[layer]
        if w is None:
            return self.weight_reasons[layer]
        if w.msa_reason:
            return w.msa_reason
        missing = self.missing.get(layer, set()) & {"x", "input"}
        if missing:
            return (
                "the attention module's input (norm1(x)) is not reachable for this block family"
                if "input" in missing
                else "the block input is not reachable"
            )
        return None

    def residual_note(self) -> dict:
        """How often the per-block rate ``||HC[X + MSA(Y)]|| / ||HC[X]||`` exceeds ``1 + B``
        (B the msa bound), which is the rate only when ``||HC[Y]|| <= ||HC[X]||``."""
        cases = sum(c for c, _ in self.naive.values())
        exceed = sum(e for _, e in self.naive.values())
        return {
            "statement": "per-block HC rate ||HC[X + MSA(Y)]|| / ||HC[X]|| <= 1 + msa bound",
            "cases": cases,
            "exceed": exceed,
            "layers_exceeding": [layer for layer, (_, e) in sorted(self.naive.items()) if e],
            "note": "not a check: with LayerNorm, Y = norm1(X) and ||HC[Y]|| / ||HC[X]|| is "
            "unbounded, so only ||HC[X]|| + B ||HC[Y]|| (checked by msa_bound) is a bound",
        }

    def figure_data(self) -> dict[str, list[dict]]:
        """Small tables for the figures (means over images)."""
        return figure_data(self._sums, self.depth, self.curve_layers, self.max_steps)
