"""The verifier's fixed-size, mergeable state and everything verify derives from it.

:class:`VerifierState` holds what the checks leave behind after each block (per-(check, layer,
head) :class:`~vitspec.verification.tally.Tallies`, the figures' float64 sums and maxima, the
reasons rows are not applicable) and nothing that grows with the images. Two states fold with
:meth:`VerifierState.merge_state`: counts and sums add, maxima take the larger, and a reason
first seen in several parts keeps the one of the lowest global batch, so a state merged from
threads, shards or ranks equals the state of one process (sums to float64 round-off, everything
else exactly). :meth:`VerifierState.plain` / :meth:`VerifierState.from_plain` put it on disk as
lists, dicts and tensors (``torch.load(weights_only=True)``), for ``vitspec merge``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitspec.verification.summaries import figure_data
from vitspec.verification.tally import Tallies, Tally

CURVE_LAYERS = 4  # layers whose r_t curves are kept for figure (a)
NOTES = ("premise_failed", "shapes", "partial")  # layer -> reason, first (lowest batch) wins


class VerifierState:
    """The mergeable part of a verifier: tallies, figure sums, reasons; no model, no tensors
    that grow with the images.

    Args:
        depth: the model's number of blocks.
        max_steps: T of lowpass_limit.
        seed: the verifier's seed.
        branch_reasons: per layer 1..depth, why the attention branch checks (msa_*) do not
            apply to its weights (None: they apply).

    Example:
        >>> s = VerifierState(depth=2, max_steps=8, seed=0, branch_reasons={1: None, 2: None})
        >>> t = VerifierState.from_plain(s.plain()); t.merge_state(s.state())
        >>> t.tallies, t.curve_layers
        ({}, [1, 2])
    """

    def __init__(
        self, depth: int, max_steps: int, seed: int, branch_reasons: dict[int, str | None]
    ) -> None:
        self.depth = depth
        self.max_steps = max_steps
        self.seed = seed
        self.branch_reasons = dict(branch_reasons)
        self.tallies = Tallies()
        self.premise_failed: dict[int, str] = {}
        self.shapes: dict[int, str] = {}  # layers whose attention the checks do not apply to
        self.partial: dict[int, str] = {}  # layers where the branch / product checks stop
        self.first: dict[tuple[str, int], int] = {}  # (note, layer) -> batch it was seen in
        self.layer_heads: dict[int, int] = {}
        self.num_heads = 0
        self.n_tokens = 0
        self.gain_diff = 0.0  # max relative |attn_hc_gain - s_a| (s_a exact or bracketed)
        self.missing: dict[int, set] = {}
        self.naive: dict[int, list[int]] = {}  # layer -> [cases, rate > 1 + bound]
        self.curve_layers = sorted(
            {round(1 + i * (depth - 1) / (CURVE_LAYERS - 1)) for i in range(CURVE_LAYERS)}
        )
        self._sums: dict[str, Tensor] = {}

    def note(self, name: str, layer: int, why: str, batch: int) -> None:
        """Record ``why`` under ``name`` (one of :data:`NOTES`) for ``layer``, seen in global
        batch ``batch``, unless the layer already has a reason."""
        notes = getattr(self, name)
        if layer not in notes:
            notes[layer] = why
            self.first[(name, layer)] = batch

    # ---- mergeable state -------------------------------------------------------------------
    def state(self) -> dict:
        """Fixed-size state: tallies, figure sums and what was not applicable."""
        return {
            "tallies": self.tallies,
            "sums": self._sums,
            **{name: getattr(self, name) for name in NOTES},
            "first": self.first,
            "missing": self.missing,
            "naive": self.naive,
            "gain_diff": self.gain_diff,
            "layer_heads": self.layer_heads,
            "num_heads": self.num_heads,
            "n_tokens": self.n_tokens,
        }

    def merge_state(self, other: dict) -> None:
        """Fold another verifier's :meth:`state` in (counts and sums add, maxima take the
        larger, a reason seen in an earlier batch replaces a later one)."""
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
        for name in NOTES:
            notes = getattr(self, name)
            for layer, why in other[name].items():
                theirs = other["first"].get((name, layer), 0)
                if layer not in notes or theirs < self.first.get((name, layer), 0):
                    notes[layer] = why
                    self.first[(name, layer)] = theirs
        self.layer_heads.update(other["layer_heads"])
        self.gain_diff = max(self.gain_diff, other["gain_diff"])
        self.num_heads = max(self.num_heads, other["num_heads"])
        self.n_tokens = max(self.n_tokens, other["n_tokens"])

    def plain(self) -> dict:
        """The state and options as lists, dicts, numbers, strings and tensors (for
        ``torch.save`` / ``torch.load(weights_only=True)`` and ``gather_object``)."""
        return {
            "depth": self.depth,
            "max_steps": self.max_steps,
            "seed": self.seed,
            "branch_reasons": [[layer, why] for layer, why in self.branch_reasons.items()],
            "tallies": [
                [check, layer, head, t.cases, t.violations, t.max_slack]
                for (check, layer, head), t in self.tallies.items()
            ],
            "sums": {name: value.clone() for name, value in self._sums.items()},
            "notes": [
                [name, layer, why, self.first.get((name, layer), 0)]
                for name in NOTES
                for layer, why in getattr(self, name).items()
            ],
            "missing": [[layer, sorted(parts)] for layer, parts in self.missing.items()],
            "naive": [[layer, cases, exceed] for layer, (cases, exceed) in self.naive.items()],
            "layer_heads": [[layer, heads] for layer, heads in self.layer_heads.items()],
            "gain_diff": self.gain_diff,
            "num_heads": self.num_heads,
            "n_tokens": self.n_tokens,
        }

    @classmethod
    def from_plain(cls, plain: dict) -> VerifierState:
        """The inverse of :meth:`plain`."""
        reasons = {int(layer): why for layer, why in plain["branch_reasons"]}
        out = cls(int(plain["depth"]), int(plain["max_steps"]), int(plain["seed"]), reasons)
        for check, layer, head, cases, violations, max_slack in plain["tallies"]:
            t = Tally()
            t.cases, t.violations, t.max_slack = int(cases), int(violations), float(max_slack)
            out.tallies[(check, layer, head)] = t
        out._sums = {name: value.to(torch.float64) for name, value in plain["sums"].items()}
        for name, layer, why, batch in plain["notes"]:
            getattr(out, name)[int(layer)] = why
            out.first[(name, int(layer))] = int(batch)
        out.missing = {int(layer): set(parts) for layer, parts in plain["missing"]}
        out.naive = {int(layer): [int(c), int(e)] for layer, c, e in plain["naive"]}
        out.layer_heads = {int(layer): int(heads) for layer, heads in plain["layer_heads"]}
        out.gain_diff = float(plain["gain_diff"])
        out.num_heads, out.n_tokens = int(plain["num_heads"]), int(plain["n_tokens"])
        return out

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
        if self.branch_reasons.get(layer):
            return self.branch_reasons[layer]
        missing = self.missing.get(layer, set()) & {"x", "input"}
        if missing:
            return (
                "the attention module's input (norm1(x)) is not reachable for this block family"
                if "input" in missing
                else "the block input is not reachable"
            )
        return None

    def consistency(self) -> dict:
        """verify.json's ``consistency``: analyze's attn_hc_gain against the exact s_a."""
        return {
            "attn_hc_gain_max_rel_diff": self.gain_diff,
            "note": "largest relative difference between analyze's attn_hc_gain (Lanczos, "
            "float32) and the exact float64 s_a used by every bound here",
        }

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

    def _slot(self, name: str, shape: tuple) -> Tensor:
        """The sums ``name``, grown (zero-padded) to hold ``shape`` (heads differ by stage)."""
        old = self._sums.get(name)
        if old is not None and all(o >= n for o, n in zip(old.shape, shape)):
            return old
        full = shape if old is None else tuple(max(o, n) for o, n in zip(old.shape, shape))
        new = torch.zeros(full, dtype=torch.float64)
        if old is not None:
            new[tuple(map(slice, old.shape))] = old
        self._sums[name] = new
        return new
