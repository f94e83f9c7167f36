"""A base for families described layer by layer: hierarchical, windowed and hybrid models.

A family lists its layers in execution order across stages (:class:`Layer`: the taps of one
residual block, its stage, prefix count, attention window, and why a site is missing) and says how
its grids are read; :class:`LayeredAdapter` turns that into the :class:`Adapter` interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vitspec.adapters.base import Adapter, Geometry, Tap
from vitspec.adapters.layout import shape_probe
from vitspec.sites import ATTN_IN, ATTN_OUT, PATTERN, RESID_MID, RESID_POST, RESID_PRE


@dataclass
class Layer:
    """One layer (a residual block) of a layered family.

    Attributes:
        stage: the stage's name for run.json (``"stage 2"``).
        post: the block output tap (``resid_post``), transformed to ``[B, N, C]``.
        layout: how ``post``'s raw value holds the grid: ``"nhwc"``, ``"nchw"``, or ``"tokens"``
            (``[B, N, C]``: then ``grid_from`` says where the grid is read).
        grid_from: ``(module, "input" | "output", "nhwc" | "nchw")``: a map with this layer's
            grid and width (for ``"tokens"`` layouts, e.g. the stage's patch embedding).
        pre: the block input tap (``resid_pre``); only layer 1's becomes a table row.
        mid: ``resid_mid`` (block input + attention branch), None when missing.
        attn_in: the attention branch input ``[B, N, C]``; attn_out: the branch added.
        pattern: the attention the block applies, ``[B, H, N, M]`` or ``[B, nW, H, n, m]``.
        prefix: prefix tokens of this layer's output.
        window: attention window (h, w) for windowed attention.
        shift: the window partition's cyclic shift.
        no_pattern: why the layer has no pattern (channel attention, no attention at all).
        no_mid: why the layer has no ``resid_mid``.
        partition: how windows are laid when not contiguous tiles of the grid (``"grid"``:
            MaxViT's dilated windows; ``"overlapping"``; ``"pixels"``: TNT's inner windows);
            layers whose partitions differ never share windows.
    """

    stage: str
    post: Tap
    layout: str = "tokens"
    grid_from: tuple[nn.Module, str, str] | None = None
    pre: Tap | None = None
    mid: Tap | None = None
    attn_in: Tap | None = None
    attn_out: Tap | None = None
    pattern: Tap | None = None
    prefix: int = 0
    window: tuple[int, int] | None = None
    shift: tuple[int, int] = (0, 0)
    no_pattern: str | None = None
    no_mid: str | None = None
    partition: str = ""


@dataclass(frozen=True)
class PartitionedGeometry(Geometry):
    """A :class:`Geometry` whose windows are laid out as ``partition`` says (see :class:`Layer`).

    Example:
        >>> a = PartitionedGeometry(0, (8, 8), 32, (4, 4), partition="grid")
        >>> a.same_tokens(Geometry(0, (8, 8), 32, (4, 4))), a.same_tokens(a)
        (False, True)
    """

    partition: str = ""

    def same_tokens(self, other: Geometry | None) -> bool:
        return super().same_tokens(other) and getattr(other, "partition", "") == self.partition


class LayeredAdapter(Adapter):
    """Adapter from a list of :class:`Layer` (built once by :meth:`build`)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layers: list[Layer] = self.build()
        self._grids: dict[tuple[int, int], list] = {}

    def build(self) -> list[Layer]:
        """The layers in execution order."""
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.layers)

    def taps(self) -> dict[tuple[str, int], Tap]:
        out = {}
        for n, layer in enumerate(self.layers, start=1):
            sites = {
                RESID_PRE: layer.pre,
                RESID_MID: layer.mid,
                RESID_POST: layer.post,
                ATTN_IN: layer.attn_in,
                ATTN_OUT: layer.attn_out,
                PATTERN: layer.pattern,
            }
            out.update({(site, n): tap for site, tap in sites.items() if tap is not None})
        return out

    def grids(self, image_hw: tuple[int, int]) -> list[tuple[tuple[int, int], int]]:
        """``(grid, channels)`` for layers 0..L, read in one zero-image forward pass from each
        layer's output map (or its ``grid_from``); layer 0 from layer 1's input map (token
        layouts: layer 1's grid, no stage changes the grid inside a block's input)."""
        probes, layouts = {}, {}
        for n, layer in enumerate(self.layers, start=1):
            if layer.grid_from is not None:
                module, when, layouts[n] = layer.grid_from
            else:
                module, when, layouts[n] = layer.post.module, layer.post.when, layer.layout
            probes[n] = (module, when)
        first = self.layers[0]
        if first.grid_from is None:
            probes[0], layouts[0] = (first.pre.module, first.pre.when), first.layout
        else:
            probes[0], layouts[0] = probes[1], layouts[1]
        shapes = shape_probe(self.model, image_hw, probes)
        return [_grid_of(shapes[n], layouts[n]) for n in range(len(self.layers) + 1)]

    def geometry(self, image_hw: tuple[int, int]) -> list[Geometry]:
        key = (int(image_hw[0]), int(image_hw[1]))
        if key not in self._grids:
            self._grids[key] = self.grids(key)
        grids = self._grids[key]
        first = self.layers[0]
        out = [Geometry(first.prefix, *grids[0], stage=first.stage)]
        for (grid, channels), layer in zip(grids[1:], self.layers):
            args = (layer.prefix, grid, channels, layer.window, layer.shift, layer.stage)
            out.append(
                PartitionedGeometry(*args, layer.partition) if layer.partition else Geometry(*args)
            )
        return out

    def unavailable(self) -> dict[str, str]:
        """``{site: reason}`` for the sites some layers lack (the run adds the layers)."""
        return _by_site(
            [(PATTERN, la.no_pattern) for la in self.layers]
            + [(RESID_MID, la.no_mid) for la in self.layers]
        )


def _grid_of(shape: tuple[int, ...], layout: str) -> tuple[tuple[int, int], int]:
    if layout == "nhwc":
        return (shape[1], shape[2]), shape[3]
    if layout == "nchw":
        return (shape[2], shape[3]), shape[1]
    raise ValueError(f"layout {layout!r}: a [B, N, C] layer needs Layer.grid_from")


def _by_site(entries: list[tuple[str, str | None]]) -> dict[str, str]:
    """``{site: reason}`` from ``(site, reason or None)``; distinct reasons of one site joined.

    Example:
        >>> _by_site([("pattern", "x"), ("pattern", None), ("pattern", "y"), ("pattern", "x")])
        {'pattern': 'x; y'}
    """
    grouped: dict[str, list[str]] = {}
    for site, reason in entries:
        if reason and reason not in grouped.setdefault(site, []):
            grouped[site].append(reason)
    return {site: "; ".join(reasons) for site, reasons in grouped.items() if reasons}
