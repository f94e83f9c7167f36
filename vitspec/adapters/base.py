"""The adapter interface: what one model family lets a run observe, as data.

An adapter says, for one model instance: which module and hook kind yields each site at each
layer (:class:`Tap`), the token geometry of every layer (:class:`Geometry`), what is not available
and why, a :meth:`Adapter.prepare` context for family switches (fused attention off, ...), and the
family knowledge consumers need (the attention branch's weights for verify, per-head parameters
such as ConViT's gate). See docs/adapters.md for how to write one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from vitspec.sites import PATTERN_SITES


@dataclass(frozen=True)
class Tap:
    """Where one site is observed.

    Attributes:
        module: the module to hook.
        when: ``"input"`` (forward pre-hook, the first positional argument, or the first keyword
            argument when called with keywords only) or ``"output"`` (forward hook, the output).
        transform: ``transform(value, batch_size) -> tensor`` in the site's layout (see
            :mod:`vitspec.sites`), e.g. NHWC ``[B, h, w, C]`` -> ``[B, h*w, C]``, windowed
            ``[B*nW, H, n, n]`` -> ``[B, nW, H, n, n]``, or a tuple output -> its attention item.
            None: the value as it is.
        plus: another tap whose value (observed earlier in the same forward, transformed) is
            added to this one's, e.g. ``resid_mid = block input + attention branch``.
    """

    module: nn.Module
    when: str = "output"
    transform: Callable[[object, int], Tensor] | None = None
    plus: Tap | None = None


@dataclass(frozen=True)
class Geometry:
    """The token layout of one layer's output (layer 0: the first block's input).

    Attributes:
        prefix: prefix tokens (class, distillation, registers) before the grid.
        grid: the patch grid (h, w) in raster order.
        channels: token width C (None: not known without running the model).
        window: the attention window (h, w) for windowed attention; None: global attention.
        shift: the window partition's cyclic shift (Swin's shifted windows).
        stage: the stage's name (``"stage 2"``, ``"class attention"``), recorded in run.json.
    """

    prefix: int
    grid: tuple[int, int]
    channels: int | None = None
    window: tuple[int, int] | None = None
    shift: tuple[int, int] = (0, 0)
    stage: str = "blocks"

    @property
    def tokens(self) -> int:
        """N = prefix + h * w."""
        return self.prefix + self.grid[0] * self.grid[1]

    def same_tokens(self, other: Geometry | None) -> bool:
        """Whether attention at this layer and at ``other`` acts on the same token sets
        (``attn_cross_layer_sim`` is defined only then)."""
        return other is not None and (
            (self.prefix, self.grid, self.window, self.shift)
            == (other.prefix, other.grid, other.window, other.shift)
        )


@dataclass
class AttentionWeights:
    """One block's attention branch as per-head linear maps, for verify's branch checks:
    ``MSA(Y) = sum_h A_h (Y w_v[h] + b_v[h]) w_o[h] + b_o`` (LayerScale folded into ``w_o``,
    ``b_o``), in float64.

    Attributes:
        w_v: ``[H, C, d]``.
        b_v: ``[H, d]`` or None.
        w_o: ``[H, d, C]``.
        b_o: ``[C]`` or None.
        not_linear: why the branch is not that sum (an extra norm, a gate, FeatScale), else
            None; the weights are still given for the per-head checks.
    """

    w_v: Tensor
    b_v: Tensor | None
    w_o: Tensor
    b_o: Tensor | None
    not_linear: str | None = None


@dataclass(frozen=True)
class FamilyInfo:
    """One row of the README's family table (generated from the registered adapters).

    Attributes:
        name: the family as researchers call it, e.g. ``"CaiT"``.
        examples: timm model names (or ``transformers`` classes).
        measured: what is measured, one short sentence.
        not_measured: what is not and why, one short sentence (``""``: nothing).
    """

    name: str
    examples: tuple[str, ...]
    measured: str
    not_measured: str = ""


class Adapter:
    """Base class of every family adapter; subclasses fill in the data for one model.

    Subclasses set :attr:`family` and :attr:`info`, take the model in ``__init__`` and implement
    :meth:`taps` and :meth:`geometry`; the rest have working defaults.
    """

    family: ClassVar[str] = ""
    info: ClassVar[FamilyInfo | None] = None

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Structural fallback: whether this adapter reads ``model`` (for unregistered classes).

        Only adapters registered with ``structural=True`` are asked.
        """
        return False

    @property
    def depth(self) -> int:
        """L, the number of layers."""
        raise NotImplementedError

    def taps(self) -> dict[tuple[str, int], Tap]:
        """``{(site, layer): Tap}`` for every site the model has."""
        raise NotImplementedError

    def geometry(self, image_hw: tuple[int, int]) -> list[Geometry]:
        """Per layer 0..L, the token geometry for ``[B, 3, *image_hw]`` inputs."""
        raise NotImplementedError

    def unavailable(self) -> dict[str, str]:
        """``{site: reason}`` for the sites this family lacks (at the layers where
        :meth:`taps` has none; the run adds the layers), and ``{metric: reason}`` for metrics
        it cannot give."""
        return {}

    def fused_modules(self) -> list[nn.Module]:
        """Modules with a ``fused_attn`` switch to turn off while patterns are observed."""
        return [m for m in self.model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]

    @contextmanager
    def prepare(self, sites: frozenset[str]) -> Iterator[None]:
        """Make the model expose the requested sites; restore it on exit (even on errors).

        The default switches fused attention (SDPA, which never forms the matrix) off on
        :meth:`fused_modules` when a pattern site is requested.
        """
        saved = []
        try:
            if sites & set(PATTERN_SITES):
                for module in self.fused_modules():
                    saved.append((module, module.fused_attn))
                    module.fused_attn = False
            yield
        finally:
            for module, fused in saved:
                module.fused_attn = fused

    def attention_weights(self, layer: int) -> AttentionWeights | str:
        """Layer ``layer``'s attention branch weights, or why they cannot be read."""
        return f"{self.family} adapter does not read attention branch weights"

    def head_params(self) -> dict[str, dict[int, Tensor]]:
        """Per-head, input-independent values reported at site ``attn``:
        ``{metric name: {layer: [H] tensor}}`` (e.g. ConViT's ``gpsa_gate``)."""
        return {}

    def stages(self, image_hw: tuple[int, int]) -> list[dict]:
        """Runs of consecutive layers 1..L sharing stage name, grid, prefix and channels, for
        run.json: ``{name, first_layer, last_layer, grid, channels, prefix}``."""
        out: list[dict] = []
        for layer, g in enumerate(self.geometry(image_hw)[1:], start=1):
            key = (g.stage, list(g.grid), g.channels, g.prefix)
            last = out[-1] if out else None
            if last and (last["name"], last["grid"], last["channels"], last["prefix"]) == key:
                last["last_layer"] = layer
            else:
                out.append(
                    {
                        "name": g.stage,
                        "first_layer": layer,
                        "last_layer": layer,
                        "grid": list(g.grid),
                        "channels": g.channels,
                        "prefix": g.prefix,
                    }
                )
        return out


def pair(value) -> tuple[int, int]:
    """``(h, w)`` from an int or a pair.

    Example:
        >>> pair(16), pair((14, 7))
        ((16, 16), (14, 7))
    """
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def flatten_nhwc(value: Tensor, batch_size: int) -> Tensor:
    """``[B, h, w, C]`` -> ``[B, h*w, C]`` (raster order); a Tap transform.

    Example:
        >>> import torch
        >>> flatten_nhwc(torch.zeros(2, 3, 4, 5), 2).shape
        torch.Size([2, 12, 5])
    """
    return value.flatten(1, 2)


def split_windows(value: Tensor, batch_size: int) -> Tensor:
    """``[B*nW, H, n, n]`` (windows of one image contiguous) -> ``[B, nW, H, n, n]``; a Tap
    transform for windowed attention.

    Example:
        >>> import torch
        >>> split_windows(torch.zeros(8, 3, 49, 49), 2).shape
        torch.Size([2, 4, 3, 49, 49])
    """
    return value.reshape(batch_size, -1, *value.shape[1:])
