"""Streaming accumulators: fixed-size float64 state, torchmetrics' verbs.

:class:`Moments` keeps (n, mean, M2) for per-image values of any trailing shape (scalars per
image, per head, per frequency...). Batches are folded in with Chan et al.'s parallel update,
which stays accurate when the spread is tiny compared with the mean (e.g. ``patch_cos_abs`` near
0.999), where sum / sum-of-squares would cancel catastrophically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vitspec.errors import VitspecError

__all__ = ["Moments"]


class Moments:
    """Running count, mean and standard deviation (ddof=1) of per-image values.

    The state is ``n`` (int) and two float64 tensors of the value shape, on the device of the
    first update; it never grows with the number of images.

    Example:
        >>> m = Moments()
        >>> m.update(torch.tensor([1.0, 2.0]))
        >>> m.update(torch.tensor([3.0]))
        >>> mean, std, n = m.compute()
        >>> mean.item(), std.item(), n
        (2.0, 1.0, 3)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every value."""
        self.n: int = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Trailing value shape, or None before the first update."""
        return None if self.mean is None else tuple(self.mean.shape)

    def _fold(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if n_b == 0:
            return
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        if tuple(mean_b.shape) != self.shape:
            raise VitspecError(
                f"Moments got values of shape {tuple(mean_b.shape)} after {self.shape}"
            )
        mean_b = mean_b.to(self.mean.device)
        m2_b = m2_b.to(self.mean.device)
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.n = n

    def update(self, values: Tensor) -> None:
        """Fold in one batch of per-image values.

        Args:
            values: ``[B, *shape]``, any float dtype and device; accumulated in float64.
        """
        if not isinstance(values, Tensor) or values.ndim < 1:
            raise VitspecError("Moments.update expects a tensor of shape [B, *shape]")
        if values.shape[0] == 0:
            return
        v = values.detach().to(torch.float64)
        mean_b = v.mean(dim=0)
        m2_b = (v - mean_b).square().sum(dim=0)
        self._fold(v.shape[0], mean_b, m2_b)

    def merge(self, other: Moments) -> None:
        """Fold in another accumulator's state (``other`` is left unchanged)."""
        if not isinstance(other, Moments):
            raise VitspecError(f"can only merge Moments, got {type(other).__name__}")
        if other.mean is not None:
            self._fold(other.n, other.mean, other.m2)

    def compute(self) -> tuple[Tensor, Tensor, int]:
        """Mean, standard deviation (ddof=1; NaN when n == 1) and n, as CPU float64.

        Raises:
            VitspecError: when no value was ever added.
        """
        if self.mean is None or self.n == 0:
            raise VitspecError("Moments.compute called before any update")
        mean = self.mean.cpu()
        if self.n > 1:
            std = (self.m2.cpu() / (self.n - 1)).clamp_min(0).sqrt()
        else:
            std = torch.full_like(mean, math.nan)
        return mean, std, self.n
