"""Forward hooks that hand what the requested sites observe to one callback, then leave no trace.

The hooks call ``emit(site, layer, tensor)`` *during* the forward pass, so a layer's tensors can
be reduced and dropped before the next layer runs: nothing is kept after the batch, and memory
does not grow with depth. Hooks are removed and the adapter's switches restored in ``finally``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor

from vitspec.adapters import Adapter, Tap
from vitspec.errors import VitspecError
from vitspec.sites import CONTRACT_SITES, SITES

Emit = Callable[[str, int, Tensor], None]


def check_sites(sites) -> tuple[str, ...]:
    """Validate the contract's token site names, keep them in the contract's order.

    Example:
        >>> check_sites(["block", "embed"])
        ('embed', 'block')
    """
    unknown = [s for s in sites if s not in CONTRACT_SITES]
    if unknown or not sites:
        raise VitspecError(
            f"unknown site {unknown[0] if unknown else '(none)'!r}; "
            f"allowed: {', '.join(CONTRACT_SITES)}"
        )
    return tuple(s for s in CONTRACT_SITES if s in sites)


@contextmanager
def capture(adapter: Adapter, sites: Iterable[str], emit: Emit) -> Iterator[None]:
    """Hook every tap of ``adapter`` whose site is in ``sites``; call ``emit(site, layer, x)``.

    Args:
        adapter: where the model's sites are.
        sites: site names of :mod:`vitspec.sites`.
        emit: receives each observation in the site's layout, in forward order.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32).eval()
        >>> from vitspec.adapters import get_adapter
        >>> seen = []
        >>> emit = lambda site, layer, x: seen.append((layer, x.shape))
        >>> with capture(get_adapter(model), {"pattern"}, emit):
        ...     _ = model(torch.zeros(1, 3, 32, 32))
        >>> seen
        [(1, torch.Size([1, 3, 5, 5])), (2, torch.Size([1, 3, 5, 5]))]
    """
    wanted = frozenset(sites)
    unknown = wanted - set(SITES)
    if unknown:
        raise VitspecError(f"unknown site {sorted(unknown)[0]!r}; allowed: {', '.join(SITES)}")
    state = _PerThread()  # several threads may run the model at once (engine's data-parallel run)
    handles = []
    with adapter.prepare(wanted):
        try:
            handles.append(
                adapter.model.register_forward_pre_hook(
                    lambda _m, args, kwargs: setattr(state, "size", _first(args, kwargs).shape[0]),
                    with_kwargs=True,
                )
            )
            for (site, layer), tap in adapter.taps().items():
                if site in wanted:
                    handles += _hooks(tap, lambda x, s=site, n=layer: emit(s, n, x), state)
            yield
        finally:
            for handle in handles:
                handle.remove()
            state.held.clear()


class _PerThread(threading.local):
    """Per-thread capture state: the batch size and the values of ``plus`` taps until their
    partner fires."""

    def __init__(self) -> None:
        self.size = 0
        self.held: dict[int, Tensor] = {}


def _first(args: tuple, kwargs: dict):
    """A forward call's first positional argument, else its first keyword argument."""
    return args[0] if args else next(iter(kwargs.values()))


def _hooks(tap: Tap, out: Callable[[Tensor], None], state: _PerThread) -> list:
    """Hooks calling ``out(value)`` for ``tap`` (plus its ``plus`` partner's value)."""
    handles = []

    def value_of(t: Tap, raw) -> Tensor:
        return raw if t.transform is None else t.transform(raw, state.size)

    if tap.plus is not None:
        key = id(tap)

        def keep(raw) -> None:
            state.held[key] = value_of(tap.plus, raw)

        def fire(raw) -> None:
            out(state.held.pop(key) + value_of(tap, raw))

        handles.append(_hook(tap.plus, keep))
    else:

        def fire(raw) -> None:
            out(value_of(tap, raw))

    handles.append(_hook(tap, fire))
    return handles


def _hook(tap: Tap, call: Callable[[object], None]):
    if tap.when == "input":
        return tap.module.register_forward_pre_hook(
            lambda _m, args, kwargs: call(_first(args, kwargs)), with_kwargs=True
        )
    if tap.when == "output":
        return tap.module.register_forward_hook(lambda _m, _a, output: call(output))
    raise VitspecError(f"tap.when is {tap.when!r}; allowed: input, output")
