"""Streaming the checks over a model's real attention, block inputs and attention branches.

A :class:`ModelVerifier` is the theory checker's run consumer: it collects a block's input, its
attention input, pattern and branch output as the forward pass produces them and runs the checks of
:class:`~vitspec.verification.blockchecks.BlockChecks` when the block returns. Its state (tallies,
figure sums, reasons; :class:`~vitspec.verification.state.VerifierState`) is fixed-size and
mergeable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vitspec.sites import ATTN_IN, ATTN_OUT, PATTERN, RESID_POST, RESID_PRE
from vitspec.verification.blockchecks import BlockChecks


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
        self.index = self.batch if info is None else info.index
        self._held.clear()
        self._paths = None
        self._gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
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
            self.note(
                "shapes",
                layer,
                f"the attention at layer {layer} has shape {tuple(x.shape)}, not [B, H, N, N]: "
                "the checks are stated for one square softmax matrix per head",
                self.index,
            )
        else:
            self._held[self._PARTS[site]] = x
