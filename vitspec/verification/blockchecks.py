"""The checks on one block's attention, in float64: the state and steps a
:class:`~vitspec.verification.model.ModelVerifier` runs when a block returns.

For block ``l`` the verifier holds the block input ``X_l``, the attention input ``Y_l``, the
attention ``A_l`` and the branch output until the block returns; :meth:`BlockChecks._process` runs
every check on them, folds the outcomes into fixed-size
:class:`~vitspec.verification.tally.Tallies` and small figure sums, and drops the tensors. Only the
product paths (``[B, paths, N, k]``) live from one layer to the next, within a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitspec.adapters import Adapter
from vitspec.functional import attn_hc_gain
from vitspec.verification import checks as ck
from vitspec.verification.state import VerifierState
from vitspec.verification.tally import PREMISE
from vitspec.verification.trajectory import Trajectory, lowpass

RANDOM_PATHS = 8  # head paths with random head choices (Dong et al. 2021)
REAL_COLS = 4  # real start vectors per trajectory set: random combinations of the real inputs
RANDOM_COLS = 4  # Gaussian start vectors


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


def branch_weights(
    adapter: Adapter, layer: int, device: torch.device
) -> tuple[BranchWeights | None, str]:
    """The adapter's reading of layer ``layer``'s branch on ``device``; ``(None, reason)``."""
    w = adapter.attention_weights(layer)
    if isinstance(w, str):
        return None, w
    move = [
        None if t is None else t.to(device, torch.float64) for t in (w.w_v, w.b_v, w.w_o, w.b_o)
    ]
    return BranchWeights(*move, ck.head_weight_norms(move[0], move[2]), w.not_linear), ""


class BlockChecks(VerifierState):
    """Per-(check, layer, head) tallies and figure summaries for one model run.

    Args:
        adapter: the model's adapter.
        device: where the float64 checks run (the forward pass's device).
        max_steps: T of lowpass_limit.
        seed: seeds the random start vectors, constants and head paths.
    """

    def __init__(self, adapter: Adapter, device: torch.device, max_steps: int = 512, seed: int = 0):
        self.adapter = adapter
        self.device = device
        self.weights: dict[int, BranchWeights | None] = {}
        reasons: dict[int, str | None] = {}
        # one intra-op thread, as the checks of every batch: LAPACK's QR and SVD round the head
        # norms differently with more threads, and the run must not depend on its thread count
        # (threads, shards and torchrun ranks give the same bits)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for layer in range(1, adapter.depth + 1):
                self.weights[layer], why = branch_weights(adapter, layer, device)
                w = self.weights[layer]
                reasons[layer] = (why if w is None else w.msa_reason) or None
        finally:
            torch.set_num_threads(threads)
        super().__init__(adapter.depth, max_steps, seed, reasons)
        self.batch = 0  # batches started by this verifier
        self.index = 0  # the run's index of the batch being checked
        self._held: dict[str, Tensor] = {}
        self._paths: Trajectory | None = None
        self._path_heads: Tensor | None = None

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
        self.layer_heads[layer] = heads
        attn = attn.to(self.device)
        premise = ck.check_row_stochastic(attn)
        for h in range(heads):
            self.tallies.add(PREMISE, layer, h, _take(premise, h))
        if bool(premise.violated.any()):
            count = int(premise.violated.sum())
            self.note(
                "premise_failed",
                layer,
                f"row_stochastic fails at layer {layer} ({count} of {b * heads} matrices in "
                f"batch {self.index + 1}, max |A1 - 1| or negative entry "
                f"{premise.slack.max():.3g} x {ck.PREMISE_TOL:g}): the theorem's premise does "
                "not hold",
                self.index,
            )
            self._paths = None
            return
        x = held.get("x")
        y = held.get("input")
        if held.get("windows"):
            x = y = None  # the tokens are not in window order: branch checks do not apply
            self.note(
                "partial",
                layer,
                f"windowed attention ({held['windows']} windows of {n} tokens): the branch and "
                "product checks need one matrix over all tokens; the per-head checks run per "
                "window",
                self.index,
            )
        w = self.weights[layer]
        a_hat = ck.renormalise(attn)
        # certified bracket (exact below ck.BRACKET_MIN_N): checks passing with the lower end
        # pass for the exact value too; the logit bound's inner inequality uses the upper end
        big = a_hat.shape[-1] >= ck.BRACKET_MIN_N
        s_a, s_hi = ck.hc_gain_bracket(a_hat, certify=False).unbind(-1)  # [B, H] each
        fast = attn_hc_gain(attn)
        self.gain_diff = max(
            self.gain_diff, float(((fast - s_a).abs() / s_a.clamp_min(1e-300)).max())
        )

        c = self._randn(b, heads).sign() * (0.5 + self._randn(b, heads).abs())
        self._add_heads("dc_passthrough", layer, ck.check_dc_passthrough(attn, c))

        values = None
        if y is not None and w is not None:
            y64 = y.to(self.device, torch.float64)
            values = torch.einsum("bnc,hcd->bhnd", y64, w.w_v)
            if w.b_v is not None:
                values = values + w.b_v[None, :, None, :]
            self._add_heads("hc_contraction", layer, ck.check_hc_contraction(a_hat, values, s_a))
        z_rand = self._randn(b, heads, n, 8)
        self._add_heads("hc_contraction", layer, ck.check_hc_contraction(a_hat, z_rand, s_a))

        self._lowpass(layer, a_hat, s_a, values)
        if held.get("windows"):
            self._paths = None  # window products would mix token sets (shifts, stages)
        else:
            self._products(layer, a_hat, s_a, x, y)

        outcome, norm, bound, a = ck.check_logit_bound(a_hat, s_a, s_a_hi=s_hi)
        if big and bool(outcome.violated.any()):  # the cheap upper end of s_a did not decide
            s_a, s_hi = ck.hc_gain_bracket(a_hat).unbind(-1)
            outcome, norm, bound, a = ck.check_logit_bound(a_hat, s_a, s_a_hi=s_hi)
        self._add_heads("logit_bound", layer, outcome)
        weyl = ck.attnscale_weyl(a_hat).unbind(1) if big else [None] * len(ck.ATTNSCALE_W)
        for wv, bound_w in zip(ck.ATTNSCALE_W, weyl):
            self._add_heads(
                "attnscale_gain",
                layer,
                ck.check_attnscale_gain(a_hat, s_a, norm, wv, weyl=bound_w),
            )
        self._accumulate(
            "gains",
            layer,
            torch.stack([s_a, norm, bound, a], dim=-1).sum(dim=0),
            count=b,
            shape=(4,),
        )
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
        res = lowpass(a_hat, z, s_a, self.max_steps)
        for h in range(heads):
            self.tallies.add(
                "lowpass_limit",
                layer,
                h,
                ck.Outcome(res.outcome.slack[:, h], res.outcome.violated[:, h]),
            )
        rate = res.rate.nan_to_num(nan=0.0)
        self._accumulate(
            "lowpass",
            layer,
            torch.stack(
                [
                    rate.sum(dim=-1),
                    res.rate.isfinite().sum(dim=-1).double(),
                    res.steps.double().mean(dim=-1),
                    (res.steps < self.max_steps).double().mean(dim=-1),
                ],
                dim=-1,
            ).sum(dim=0),
            count=b,
            shape=(4,),
        )
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
            self._accumulate(
                "curves", layer, curve, count=b, shape=(3, heads, self.max_steps), per_head=False
            )

    def _products(
        self, layer: int, a_hat: Tensor, s_a: Tensor, x: Tensor | None, y: Tensor | None
    ) -> None:
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
            self._paths = Trajectory(z)
        if self._paths is not None and self._paths.w.shape[:3] != (b, heads + RANDOM_PATHS, n):
            self._paths = None  # windows, token count or heads changed: no common token set
            self.note(
                "partial",
                layer,
                f"the attention at layer {layer} ({b} matrices of {n} tokens, {heads} heads) "
                "does not continue the previous layers' token set: products stop here",
                self.index,
            )
        if self._paths is None:
            return
        idx = self._path_heads[:, layer - 1]
        r, bound, out = self._paths.step(a_hat[:, idx], s_a[:, idx])
        for p in range(heads + RANDOM_PATHS):
            head = p if p < heads else -1
            self.tallies.add(
                "product_lowpass", layer, head, ck.Outcome(out.slack[:, p], out.violated[:, p])
            )
        same, rand = slice(0, heads), slice(heads, None)
        lr, lb = r.clamp_min(1e-300).log10(), bound.clamp_min(1e-300).log10()
        self._accumulate(
            "products",
            layer,
            torch.stack(
                [
                    lr[:, same].mean(dim=(1, 2)),
                    lb[:, same].mean(dim=(1, 2)),
                    lr[:, rand].mean(dim=(1, 2)),
                    lb[:, rand].mean(dim=(1, 2)),
                ],
                dim=-1,
            ).sum(dim=0),
            count=b,
            shape=(4,),
            per_head=False,
        )

    def _msa(
        self,
        layer: int,
        a_hat: Tensor,
        s_a: Tensor,
        x: Tensor,
        y: Tensor,
        values: Tensor,
        output: Tensor | None,
        w: BranchWeights,
    ) -> None:
        x64 = x.to(self.device, torch.float64)
        y64 = y.to(self.device, torch.float64)
        heads_out = a_hat @ values  # [B, H, N, d] (the value bias passes A as DC)
        msa = torch.einsum("bhnd,hdc->bnc", heads_out, w.w_o)
        if w.b_o is not None:
            msa = msa + w.b_o
        err_scale = (
            torch.linalg.matrix_norm(a_hat)
            * torch.linalg.matrix_norm(values)
            * torch.linalg.matrix_norm(w.w_o)
        ).sum(dim=1)
        res = ck.check_msa_bound(x64, y64, msa, s_a, w.head_norms, err_scale)
        self.tallies.add("msa_bound", layer, None, res.branch)
        self.tallies.add("msa_residual", layer, None, res.residual)
        self._accumulate(
            "blocks",
            layer,
            torch.stack(
                [res.gain, res.bound, res.rate, res.rate_bound, 1 + res.bound, res.y_over_x], dim=-1
            ).sum(dim=0),
            count=x.shape[0],
            shape=(6,),
            per_head=False,
        )
        naive = self.naive.setdefault(layer, [0, 0])
        naive[0] += x.shape[0]
        naive[1] += int((res.rate > 1 + res.bound).sum())
        self._accumulate_max("blocks_max", layer, torch.stack([res.gain, res.rate]).amax(dim=1))
        if output is not None:
            out64 = output.to(self.device, torch.float64)
            rel = torch.linalg.matrix_norm(msa - out64) / torch.linalg.matrix_norm(out64).clamp_min(
                1e-300
            )
            slack = rel / ck.RECON_TOL
            self.tallies.add("msa_reconstruction", layer, None, ck.Outcome(slack, ~(slack <= 1)))

    # ---- fixed-size summaries ----------------------------------------------------------------
    def _accumulate(
        self,
        name: str,
        layer: int,
        value: Tensor,
        *,
        count: int,
        shape: tuple,
        per_head: bool = True,
    ) -> None:
        value = value.detach().double().cpu()
        self._slot(name, (self.depth + 1, *value.shape))[(layer, *map(slice, value.shape))] += value
        self._slot(name + "_n", (self.depth + 1,))[layer] += count
        if per_head:
            self._slot("heads", (self.depth + 1,))[layer] = value.shape[0]

    def _accumulate_max(self, name: str, layer: int, value: Tensor) -> None:
        value = value.double().cpu()
        sums = self._slot(name, (self.depth + 1, *value.shape))
        part = (layer, *map(slice, value.shape))
        sums[part] = torch.maximum(sums[part], value)


def _take(outcome: ck.Outcome, h: int) -> ck.Outcome:
    return ck.Outcome(outcome.slack[:, h], outcome.violated[:, h])
