"""Streaming the checks over a model's real attention, block inputs and attention branches.

A :class:`ModelVerifier` is the consumer the capture hooks call. For block ``l`` it holds the
block input ``X_l``, the attention input ``Y_l``, the attention ``A_l`` and the branch output
until the block returns, runs every check on them in float64, folds the outcomes into
fixed-size :class:`~vitspec.verification.tally.Tallies` and small figure summaries, and drops the
tensors. Only the product paths (``[B, paths, N, k]``) live from one layer to the next, within a
batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitspec.adapters import Adapter
from vitspec.functional import attn_hc_gain
from vitspec.sites import ATTN_IN, ATTN_OUT, PATTERN, RESID_POST, RESID_PRE
from vitspec.verification import checks as ck
from vitspec.verification.summaries import figure_data
from vitspec.verification.tally import PREMISE, Tallies

RANDOM_PATHS = 8  # head paths with random head choices (Dong et al. 2021)
REAL_COLS = 4  # real start vectors per trajectory set: random combinations of the real inputs
RANDOM_COLS = 4  # Gaussian start vectors
CURVE_LAYERS = 4  # layers whose r_t curves are kept for figure (a)


@dataclass
class BranchWeights:
    """One block's attention branch on the checks' device (float64), with the per-head norms
    ``||W_V^h W_O^h||_2``; see :class:`~vitspec.adapters.AttentionWeights`."""

    w_v: Tensor  # [H, C, d]
    b_v: Tensor | None  # [H, d]
    w_o: Tensor  # [H, d, C]
    b_o: Tensor | None  # [C]
    head_norms: Tensor  # [H]
    msa_reason: str | None  # why msa_bound is not applicable (None: applicable)


def branch_weights(adapter: Adapter, layer: int, device: torch.device
                   ) -> tuple[BranchWeights | None, str]:
    """The adapter's reading of layer ``layer``'s branch on ``device``; ``(None, reason)``."""
    w = adapter.attention_weights(layer)
    if isinstance(w, str):
        return None, w
    move = [None if t is None else t.to(device, torch.float64) for t in (w.w_v, w.b_v, w.w_o,
                                                                        w.b_o)]
    return BranchWeights(*move, ck.head_weight_norms(move[0], move[2]), w.not_linear), ""


class ModelVerifier:
    """Per-(check, layer, head) tallies and figure summaries for one model run.

    Args:
        adapter: the model's adapter.
        device: where the float64 checks run (the forward pass's device).
        max_steps: T of lowpass_limit.
        seed: seeds the random start vectors, constants and head paths.
    """

    def __init__(self, adapter: Adapter, device: torch.device, max_steps: int = 512,
                 seed: int = 0):
        self.adapter = adapter
        self.device = device
        self.max_steps = max_steps
        self.seed = seed
        self.depth = adapter.depth
        self.tallies = Tallies()
        self.weights: dict[int, BranchWeights | None] = {}
        self.weight_reasons: dict[int, str] = {}
        for layer in range(1, self.depth + 1):
            self.weights[layer], self.weight_reasons[layer] = branch_weights(adapter, layer,
                                                                             device)
        self.premise_failed: dict[int, str] = {}
        self.shapes: dict[int, str] = {}  # layers whose attention the checks do not apply to
        self.num_heads = 0
        self.n_tokens = 0
        self.batch = 0
        self.gain_diff = 0.0  # max relative |attn_hc_gain - s_a| (s_a exact or bracketed)
        self.missing: dict[int, set] = {}
        self.naive: dict[int, list[int]] = {}  # layer -> [cases, rate > 1 + bound]
        self.curve_layers = sorted({round(1 + i * (self.depth - 1) / (CURVE_LAYERS - 1))
                                    for i in range(CURVE_LAYERS)})
        self._sums: dict[str, Tensor] = {}
        self._held: dict[str, Tensor] = {}
        self._paths: ck.Trajectory | None = None
        self._path_heads: Tensor | None = None

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
        elif site == PATTERN and (x.dim() != 4 or x.shape[-1] != x.shape[-2]):
            self.shapes.setdefault(layer, (
                f"the attention at layer {layer} has shape {tuple(x.shape)}, not [B, H, N, N]: "
                "the checks are stated for one square softmax matrix per head"))
        else:
            self._held[self._PARTS[site]] = x

    def state(self) -> dict:
        """Fixed-size state: tallies, figure sums and what was not applicable."""
        return {"tallies": self.tallies, "sums": self._sums, "premise_failed": self.premise_failed,
                "missing": self.missing, "naive": self.naive, "gain_diff": self.gain_diff,
                "shapes": self.shapes, "num_heads": self.num_heads, "n_tokens": self.n_tokens}

    def merge_state(self, other: dict) -> None:
        """Fold another verifier's :meth:`state` in (counts add, maxima take the larger)."""
        self.tallies.merge(other["tallies"])
        for key, value in other["sums"].items():
            if key not in self._sums:
                self._sums[key] = value.clone()
            elif key.endswith("_max"):
                self._sums[key] = torch.maximum(self._sums[key], value)
            else:
                self._sums[key] = self._sums[key] + value
        for layer, (cases, exceed) in other["naive"].items():
            mine = self.naive.setdefault(layer, [0, 0])
            mine[0], mine[1] = mine[0] + cases, mine[1] + exceed
        for layer, parts in other["missing"].items():
            self.missing.setdefault(layer, set()).update(parts)
        for name in ("premise_failed", "shapes"):
            for layer, why in other[name].items():
                getattr(self, name).setdefault(layer, why)
        self.gain_diff = max(self.gain_diff, other["gain_diff"])
        self.num_heads = max(self.num_heads, other["num_heads"])
        self.n_tokens = max(self.n_tokens, other["n_tokens"])

    # ---- the checks on one block -------------------------------------------------------------
    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self._gen, dtype=torch.float64).to(self.device)

    def _process(self, layer: int) -> None:
        held, self._held = self._held, {}
        attn = held.get("attn")
        if attn is None:
            return
        for part in ("x", "input", "output"):
            if part not in held:
                self.missing.setdefault(layer, set()).add(part)
        b, heads, n, _ = attn.shape
        self.num_heads, self.n_tokens = heads, n
        attn = attn.to(self.device)
        premise = ck.check_row_stochastic(attn)
        for h in range(heads):
            self.tallies.add(PREMISE, layer, h, _take(premise, h))
        if bool(premise.violated.any()):
            count = int(premise.violated.sum())
            self.premise_failed.setdefault(layer, (
                f"row_stochastic fails at layer {layer} ({count} of {b * heads} matrices in "
                f"batch {self.batch}, max |A1 - 1| or negative entry {premise.slack.max():.3g} "
                f"x {ck.PREMISE_TOL:g}): the theorem's premise does not hold"))
            self._paths = None
            return
        x = held.get("x")
        y = held.get("input")
        w = self.weights[layer]
        a_hat = ck.renormalise(attn)
        # certified bracket (exact below ck.BRACKET_MIN_N): checks passing with the lower end
        # pass for the exact value too; the logit bound's inner inequality uses the upper end
        big = a_hat.shape[-1] >= ck.BRACKET_MIN_N
        s_a, s_hi = ck.hc_gain_bracket(a_hat, certify=False).unbind(-1)  # [B, H] each
        fast = attn_hc_gain(attn)
        self.gain_diff = max(self.gain_diff, float(((fast - s_a).abs() / s_a.clamp_min(1e-300))
                                                   .max()))

        c = (self._randn(b, heads).sign() * (0.5 + self._randn(b, heads).abs()))
        self._add_heads("dc_passthrough", layer, ck.check_dc_passthrough(attn, c))

        values = None
        if y is not None and w is not None:
            y64 = y.to(self.device, torch.float64)
            values = torch.einsum("bnc,hcd->bhnd", y64, w.w_v)
            if w.b_v is not None:
                values = values + w.b_v[None, :, None, :]
            self._add_heads("hc_contraction", layer,
                            ck.check_hc_contraction(a_hat, values, s_a))
        z_rand = self._randn(b, heads, n, 8)
        self._add_heads("hc_contraction", layer, ck.check_hc_contraction(a_hat, z_rand, s_a))

        self._lowpass(layer, a_hat, s_a, values)
        self._products(layer, a_hat, s_a, x, y)

        outcome, norm, bound, a = ck.check_logit_bound(a_hat, s_a, s_a_hi=s_hi)
        if big and bool(outcome.violated.any()):  # the cheap upper end of s_a did not decide
            s_a, s_hi = ck.hc_gain_bracket(a_hat).unbind(-1)
            outcome, norm, bound, a = ck.check_logit_bound(a_hat, s_a, s_a_hi=s_hi)
        self._add_heads("logit_bound", layer, outcome)
        weyl = ck.attnscale_weyl(a_hat).unbind(1) if big else [None] * len(ck.ATTNSCALE_W)
        for wv, bound_w in zip(ck.ATTNSCALE_W, weyl):
            self._add_heads("attnscale_gain", layer,
                            ck.check_attnscale_gain(a_hat, s_a, norm, wv, weyl=bound_w))
        self._accumulate("gains", layer, torch.stack([s_a, norm, bound, a], dim=-1).sum(dim=0),
                         count=b, shape=(4,))
        self._accumulate_max("gains_max", layer, s_a.amax(dim=0))

        if w is not None and w.msa_reason is None and x is not None and y is not None:
            self._msa(layer, a_hat, s_a, x, y, values, held.get("output"), w)

    def _add_heads(self, check: str, layer: int, outcome: ck.Outcome) -> None:
        for h in range(outcome.slack.shape[1]):
            self.tallies.add(check, layer, h, _take(outcome, h))

    def _lowpass(self, layer: int, a_hat: Tensor, s_a: Tensor, values: Tensor | None) -> None:
        b, heads, n, _ = a_hat.shape
        cols = [self._randn(b, heads, n, RANDOM_COLS)]
        if values is not None:  # random combinations of the head's real value features
            cols.insert(0, values @ self._randn(values.shape[-1], REAL_COLS).to(values))
        z = torch.cat(cols, dim=-1)
        res = ck.lowpass(a_hat, z, s_a, self.max_steps)
        for h in range(heads):
            self.tallies.add("lowpass_limit", layer, h,
                             ck.Outcome(res.outcome.slack[:, h], res.outcome.violated[:, h]))
        rate = res.rate.nan_to_num(nan=0.0)
        self._accumulate("lowpass", layer, torch.stack(
            [rate.sum(dim=-1), res.rate.isfinite().sum(dim=-1).double(),
             res.steps.double().mean(dim=-1),
             (res.steps < self.max_steps).double().mean(dim=-1)], dim=-1).sum(dim=0),
            count=b, shape=(4,))
        if layer in self.curve_layers:
            k = REAL_COLS if values is not None else RANDOM_COLS
            r, bound = res.r[:, :, :k], res.bound[:, :, :k]  # real start vectors first
            steps = r.shape[-1]
            pad = self.max_steps - steps
            finite = r.isfinite() & (r > 0)  # a bound that overflowed (s_a > 1) stays inf
            lr = torch.where(finite, r.clamp_min(1e-300).log10(), 0).sum(dim=(0, 2))
            lb = torch.where(finite, bound.clamp_min(1e-300).log10(), 0).sum(dim=(0, 2))
            cnt = finite.sum(dim=(0, 2)).double()
            curve = torch.stack([torch.nn.functional.pad(t, (0, pad)) for t in (lr, lb, cnt)])
            self._accumulate("curves", layer, curve, count=b, shape=(3, heads, self.max_steps),
                             per_head=False)

    def _products(self, layer: int, a_hat: Tensor, s_a: Tensor, x: Tensor | None,
                  y: Tensor | None) -> None:
        b, heads, n, _ = a_hat.shape
        if self._path_heads is None or self._path_heads.shape[0] != heads + RANDOM_PATHS:
            gen = torch.Generator().manual_seed(self.seed + 7)
            same = torch.arange(heads)[:, None].expand(heads, self.depth)
            rand = torch.randint(0, heads, (RANDOM_PATHS, self.depth), generator=gen)
            self._path_heads = torch.cat([same, rand]).to(self.device)
        if layer == 1:
            start = y if y is not None else x
            cols = [self._randn(b, 1, n, RANDOM_COLS)]
            if start is not None:
                s64 = start.to(self.device, torch.float64)[:, None]
                cols.insert(0, s64 @ self._randn(s64.shape[-1], REAL_COLS))
            z = torch.cat(cols, dim=-1).expand(-1, heads + RANDOM_PATHS, -1, -1)
            self._paths = ck.Trajectory(z)
        if self._paths is None:
            return
        idx = self._path_heads[:, layer - 1]
        r, bound, out = self._paths.step(a_hat[:, idx], s_a[:, idx])
        for p in range(heads + RANDOM_PATHS):
            head = p if p < heads else -1
            self.tallies.add("product_lowpass", layer, head,
                             ck.Outcome(out.slack[:, p], out.violated[:, p]))
        same, rand = slice(0, heads), slice(heads, None)
        lr, lb = r.clamp_min(1e-300).log10(), bound.clamp_min(1e-300).log10()
        self._accumulate("products", layer, torch.stack([
            lr[:, same].mean(dim=(1, 2)), lb[:, same].mean(dim=(1, 2)),
            lr[:, rand].mean(dim=(1, 2)), lb[:, rand].mean(dim=(1, 2))], dim=-1).sum(dim=0),
            count=b, shape=(4,), per_head=False)

    def _msa(self, layer: int, a_hat: Tensor, s_a: Tensor, x: Tensor, y: Tensor,
             values: Tensor, output: Tensor | None, w: BranchWeights) -> None:
        x64 = x.to(self.device, torch.float64)
        y64 = y.to(self.device, torch.float64)
        heads_out = a_hat @ values  # [B, H, N, d] (the value bias passes A as DC)
        msa = torch.einsum("bhnd,hdc->bnc", heads_out, w.w_o)
        if w.b_o is not None:
            msa = msa + w.b_o
        err_scale = (torch.linalg.matrix_norm(a_hat) * torch.linalg.matrix_norm(values)
                     * torch.linalg.matrix_norm(w.w_o)).sum(dim=1)
        res = ck.check_msa_bound(x64, y64, msa, s_a, w.head_norms, err_scale)
        self.tallies.add("msa_bound", layer, None, res.branch)
        self.tallies.add("msa_residual", layer, None, res.residual)
        self._accumulate("blocks", layer, torch.stack(
            [res.gain, res.bound, res.rate, res.rate_bound, 1 + res.bound,
             res.y_over_x], dim=-1).sum(dim=0), count=x.shape[0], shape=(6,),
            per_head=False)
        naive = self.naive.setdefault(layer, [0, 0])
        naive[0] += x.shape[0]
        naive[1] += int((res.rate > 1 + res.bound).sum())
        self._accumulate_max("blocks_max", layer, torch.stack([res.gain, res.rate]).amax(dim=1))
        if output is not None:
            out64 = output.to(self.device, torch.float64)
            rel = (torch.linalg.matrix_norm(msa - out64) / torch.linalg.matrix_norm(out64)
                   .clamp_min(1e-300))
            slack = rel / ck.RECON_TOL
            self.tallies.add("msa_reconstruction", layer, None, ck.Outcome(slack, ~(slack <= 1)))

    # ---- fixed-size summaries ----------------------------------------------------------------
    def _accumulate(self, name: str, layer: int, value: Tensor, *, count: int, shape: tuple,
                    per_head: bool = True) -> None:
        full = (self.depth + 1, *((value.shape[0],) if per_head else ()), *shape)
        key = f"{name}"
        if key not in self._sums or tuple(self._sums[key].shape) != full:
            self._sums[key] = torch.zeros(full, dtype=torch.float64)
            self._sums[key + "_n"] = torch.zeros(self.depth + 1, dtype=torch.float64)
        self._sums[key][layer] += value.detach().double().cpu()
        self._sums[key + "_n"][layer] += count

    def _accumulate_max(self, name: str, layer: int, value: Tensor) -> None:
        full = (self.depth + 1, *value.shape)
        if name not in self._sums or tuple(self._sums[name].shape) != full:
            self._sums[name] = torch.zeros(full, dtype=torch.float64)
        self._sums[name][layer] = torch.maximum(self._sums[name][layer], value.double().cpu())

    # ---- results ---------------------------------------------------------------------------
    def not_applicable(self) -> dict[tuple, str]:
        """``(check, layer, head) -> reason`` for every row that is not applicable."""
        na: dict[tuple, str] = {}
        heads = list(range(self.num_heads))
        per_head = ("dc_passthrough", "hc_contraction", "lowpass_limit", "logit_bound",
                    "attnscale_gain")
        first_fail = min(self.premise_failed, default=None)
        for layer in range(1, self.depth + 1):
            if not any(k[1] == layer for k in self.tallies):
                continue  # no attention reached this block (e.g. a refused tap)
            reason = self.premise_failed.get(layer)
            if reason:
                for check in per_head:
                    na.update({(check, layer, h): reason for h in heads})
                for check in ("msa_bound", "msa_residual", "msa_reconstruction"):
                    na[(check, layer, None)] = reason
            if first_fail is not None and layer >= first_fail:
                why = reason or (f"the head paths pass through layer {first_fail}, where "
                                 f"{self.premise_failed[first_fail]}")
                na.update({("product_lowpass", layer, h): why for h in [*heads, -1]})
            if reason:
                continue
            msa_reason = self._msa_reason(layer)
            if msa_reason:
                for check in ("msa_bound", "msa_residual", "msa_reconstruction"):
                    na[(check, layer, None)] = msa_reason
            elif "output" in self.missing.get(layer, ()):
                na[("msa_reconstruction", layer, None)] = (
                    "the attention branch output is not reachable for this block family")
        return na

    def _msa_reason(self, layer: int) -> str | None:
        w = self.weights[layer]
        if w is None:
            return self.weight_reasons[layer]
        if w.msa_reason:
            return w.msa_reason
        missing = self.missing.get(layer, set()) & {"x", "input"}
        if missing:
            return ("the attention module's input (norm1(x)) is not reachable for this block "
                    "family" if "input" in missing else "the block input is not reachable")
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


def _take(outcome: ck.Outcome, h: int) -> ck.Outcome:
    return ck.Outcome(outcome.slack[:, h], outcome.violated[:, h])
