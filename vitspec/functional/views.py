"""Views: one site's tokens or one layer's attention, with the intermediates that several metrics
share computed once, on first use (``functools.cached_property``).

Every metric function accepts a raw tensor or a view; the Collector builds one view per site and
layer and passes it to every selected metric, so e.g. the centred tokens, the unit patch vectors,
the compute-dtype maps and their column norms are formed once per batch, not once per metric.
A view is plain, short-lived data: it holds the tensors of one batch and nothing else.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from vitspec.errors import VitspecError
from vitspec.functional.linalg import compute_dtype

__all__ = ["AttnView", "TokenView", "attn_view", "map_groups", "per_map", "token_view"]

_F64 = torch.float64
# Elementwise work on attention maps runs over groups of maps of about this size (CPU): the
# temporaries then stay in cache and come from the allocator's free lists, instead of page
# faults on fresh full-size buffers (several times the arithmetic at N = 1370).
_GROUP_BYTES = 4 << 20


def map_groups(maps: Tensor) -> list[Tensor]:
    """``maps`` ``[..., N, M]`` as consecutive groups ``[g, N, M]`` of about 4 MiB (one group
    off the CPU).

    Example:
        >>> [g.shape[0] for g in map_groups(torch.zeros(3, 5, 400, 400))]
        [6, 6, 3]
    """
    flat = maps.reshape(-1, *maps.shape[-2:])
    if maps.device.type != "cpu" or flat.shape[0] == 0:
        return [flat]
    per = max(1, _GROUP_BYTES // max(1, maps.shape[-1] * maps.shape[-2] * maps.element_size()))
    return list(flat.split(per))


def per_map(fn, *maps: Tensor) -> Tensor:
    """``fn`` applied to matching groups of ``maps`` (all ``[..., N, M]`` of one shape), its
    ``[g, ...]`` results joined and shaped ``[..., ...]``.

    Example:
        >>> per_map(lambda a: a.sum(dim=-1), torch.ones(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4])
    """
    groups = zip(*(map_groups(m) for m in maps))
    out = torch.cat([fn(*g) for g in groups])
    return out.reshape(*maps[0].shape[:-2], *out.shape[1:])


class TokenView:
    """Tokens ``[B, N, C]`` of one site: ``num_prefix`` prefix tokens, then the patch grid.

    Example:
        >>> v = TokenView(torch.ones(2, 5, 3), 1, (2, 2))
        >>> v.hc.abs().max().item()
        0.0
    """

    def __init__(self, tokens: Tensor, num_prefix: int, grid: tuple[int, int]):
        _check_tokens(tokens, num_prefix, grid)
        self.tokens = tokens
        self.num_prefix = int(num_prefix)
        self.grid = (int(grid[0]), int(grid[1]))

    @cached_property
    def x(self) -> Tensor:
        """Tokens in float64, ``[B, N, C]``."""
        return self.tokens.to(_F64)

    @cached_property
    def mean(self) -> Tensor:
        """Token mean over all N tokens (the DC row), ``[B, C]``."""
        return self.x.mean(dim=1)

    @cached_property
    def hc(self) -> Tensor:
        """``HC[X] = X - J X`` over all N tokens, ``[B, N, C]`` float64."""
        return self.x - self.mean[:, None]

    @cached_property
    def hc_energy(self) -> Tensor:
        """``||HC[X]||_F^2``, ``[B]``, from the centred tokens (never total minus DC)."""
        return self.hc.square().sum(dim=(1, 2))

    @cached_property
    def dc_energy(self) -> Tensor:
        """``||DC[X]||_F^2 = N ||mean||^2``, ``[B]``."""
        return self.mean.square().sum(dim=-1) * self.x.shape[1]

    @cached_property
    def energy(self) -> Tensor:
        """``||X||_F^2``, ``[B]``."""
        return self.x.square().sum(dim=(1, 2))

    @cached_property
    def patches(self) -> Tensor:
        """Patch tokens in raster order, ``[B, G, C]`` float64."""
        return self.x[:, self.num_prefix :]

    @cached_property
    def unit_patches(self) -> Tensor:
        """Unit-norm patch tokens ``[B, G, C]`` float64 (a zero token stays zero)."""
        p = self.patches
        return p / p.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(_F64).tiny)

    @cached_property
    def hc_gram(self) -> Tensor:
        """Gram matrix of HC[X] on its smaller side, float64 (its eigenvalues are ``s_k^2``)."""
        hc = self.hc
        return hc @ hc.mT if hc.shape[1] <= hc.shape[2] else hc.mT @ hc

    @cached_property
    def dlogamp(self) -> Tensor:
        """The ``dlogamp`` curve ``[B, K]``: only the K grid frequencies on the diagonal are formed.

        After the roll by ``(h//2, w//2)``, diagonal entry ``i`` (``i = h//2 .. min(h, w) - 1``) is
        the 2-D DFT coefficient at ``(u, v) = ((i - h//2) mod h, (i - w//2) mod w)``, and the mean
        over channels commutes with picking entries, so an explicit ``K x G`` DFT in float64 gives
        exactly the contract's values without transforming the whole grid.
        """
        h, w = self.grid
        start, stop = h // 2, min(h, w)
        if stop <= start:
            raise VitspecError(
                f"dlogamp needs min(h, w) > h // 2 for the grid diagonal, got grid ({h}, {w})"
            )
        i = torch.arange(start, stop, dtype=_F64, device=self.x.device)
        u, v = (i - h // 2) % h, (i - w // 2) % w
        y = torch.arange(h, dtype=_F64, device=self.x.device)
        x = torch.arange(w, dtype=_F64, device=self.x.device)
        phase = (
            2
            * math.pi
            * (u[:, None, None] * y[None, :, None] / h + v[:, None, None] * x[None, None, :] / w)
        )  # [K, h, w]
        basis = torch.cat([phase.cos(), phase.sin()]).reshape(2 * len(i), h * w)
        z = basis @ self.patches  # [B, 2K, C]: real and (minus) imaginary parts
        amp = (z[:, : len(i)].square() + z[:, len(i) :].square()).sqrt()
        d = torch.log(amp + 1e-6).mean(dim=-1)
        return d - d[:, :1]


class AttnView:
    """Post-softmax attention ``[B, H, N, N]`` of one layer (rows: queries, columns: keys).

    Args:
        attn: the attention maps (float32 stays float32, float64 stays float64).
        prev: the previous layer's view for the same images, for ``attn_cross_layer_sim``.
        square: False accepts ``[B, H, N, M]`` (keys reduced, class attention), for the metrics
            over each row (``attn_entropy``) only.

    Example:
        >>> AttnView(torch.full((1, 1, 4, 4), 0.25)).nonnegative
        True
    """

    def __init__(self, attn: Tensor, prev: AttnView | None = None, square: bool = True):
        self.attn = _check_attn(attn, square=square)
        self.prev = prev

    @cached_property
    def a(self) -> Tensor:
        """The maps in the compute dtype (float64 for float64 input, else float32)."""
        return self.attn.to(compute_dtype(self.attn))

    @cached_property
    def nonnegative(self) -> bool:
        return all(bool(g.amin() >= 0) for g in map_groups(self.a))  # False for NaN too

    @cached_property
    def row_sums(self) -> Tensor:
        """``A 1``, ``[B, H, N]`` float64, summed in the compute dtype (a float32 sum of a
        row of probabilities is within ~1e-6 of 1, far inside the 1e-4 row-stochastic test;
        a float64 accumulation costs a converting pass over the maps)."""
        return per_map(lambda g: g.sum(dim=-1), self.a).to(_F64)

    def rows_sum_to_one(self, atol: float = 1e-4) -> bool:
        """Every row sums to 1 within ``atol``."""
        return bool(((self.row_sums - 1).abs() <= atol).all())

    @cached_property
    def inv_column_norms(self) -> Tensor:
        """``1 / ||A[:, t]||`` per key column (0 for a zero column), ``[B, H, N]``: the column
        scaling of the cosine metrics, applied to products instead of forming unit columns."""
        norms = per_map(lambda g: g.square().sum(dim=-2), self.a).sqrt()
        return torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))


def token_view(tokens: Tensor | TokenView, num_prefix: int, grid: tuple[int, int]) -> TokenView:
    """``tokens`` itself when it is already a view, else a new :class:`TokenView`."""
    return tokens if isinstance(tokens, TokenView) else TokenView(tokens, num_prefix, grid)


def attn_view(attn: Tensor | AttnView, prev: Tensor | AttnView | None = None) -> AttnView:
    """``attn`` itself when it is already a view, else a new :class:`AttnView` (with ``prev``)."""
    if isinstance(attn, AttnView):
        return attn
    if prev is not None and not isinstance(prev, AttnView):
        prev = AttnView(prev)
    return AttnView(attn, prev)


def _check_tokens(tokens: Tensor, num_prefix: int, grid: tuple[int, int]) -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise VitspecError(f"tokens must be a tensor of shape [B, N, C], got {shape}")
    if not tokens.is_floating_point():
        raise VitspecError(f"tokens must be floating point, got {tokens.dtype}")
    if len(grid) != 2 or min(grid) < 1:
        raise VitspecError(f"grid must be (h, w) with h, w >= 1, got {tuple(grid)}")
    h, w = int(grid[0]), int(grid[1])
    if num_prefix < 0 or tokens.shape[1] != num_prefix + h * w:
        raise VitspecError(
            f"tokens have N={tokens.shape[1]} but num_prefix={num_prefix} plus grid {h}x{w} "
            f"gives {num_prefix + h * w}"
        )


def _check_attn(attn: Tensor, name: str = "attn", square: bool = True) -> Tensor:
    if not isinstance(attn, Tensor):
        raise VitspecError(f"{name} must be a torch.Tensor, got {type(attn).__name__}")
    if attn.ndim != 4 or (square and attn.shape[-1] != attn.shape[-2]):
        raise VitspecError(f"{name} must have shape [B, H, N, N], got {tuple(attn.shape)}")
    if not attn.is_floating_point():
        raise VitspecError(f"{name} must be a floating-point tensor, got {attn.dtype}")
    return attn
