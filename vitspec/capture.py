"""Forward hooks that hand one batch's tokens and attention to callbacks, then leave no trace.

The hooks call back *during* the forward pass, so a layer's tensors can be reduced and dropped
before the next layer runs: nothing is kept after the batch, and memory does not grow with depth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from vitspec.adapters import Adapter
from vitspec.errors import VitspecError

SITES = ("embed", "mid", "block")

TokenCallback = Callable[[str, int, Tensor], None]
AttentionCallback = Callable[[int, Tensor], None]
BranchCallback = Callable[[str, int, Tensor], None]


def check_sites(sites) -> tuple[str, ...]:
    """Validate site names, keep them in the contract's order.

    Example:
        >>> check_sites(["block", "embed"])
        ('embed', 'block')
    """
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise VitspecError(
            f"unknown site {unknown[0] if unknown else '(none)'!r}; allowed: {', '.join(SITES)}"
        )
    return tuple(s for s in SITES if s in sites)


@contextmanager
def capture(
    adapter: Adapter,
    *,
    sites: tuple[str, ...],
    on_tokens: TokenCallback,
    on_attention: AttentionCallback | None = None,
    on_pre_attention: AttentionCallback | None = None,
    on_attn_branch: BranchCallback | None = None,
) -> Iterator[None]:
    """Register exactly the hooks the sites need; remove them and restore fused attention on exit.

    Args:
        adapter: where the model's blocks, attention and residual branches are.
        sites: token sites among ``embed``, ``mid``, ``block``.
        on_tokens: called as ``on_tokens(site, layer, tokens[B, N, C])``.
        on_attention: called as ``on_attention(layer, attn[B, H, N, N])`` with the post-softmax
            attention of block ``layer`` (1-based). When given, fused attention (SDPA, which never
            forms the matrix) is switched off on every attention module for the duration.
        on_pre_attention: called as ``on_pre_attention(layer, attn[B, H, N, N])`` with the
            pre-scale attention ``A`` of blocks with AttnScale (``adapter.pre_attn_taps``; see
            :mod:`vitspec.scaling`), before ``on_attention`` gets that block's ``A'``.
        on_attn_branch: called as ``on_attn_branch("input", layer, y[B, N, C])`` with the input
            of block ``layer``'s attention module (``adapter.attn_modules``; timm: ``norm1(x)``)
            and as ``on_attn_branch("output", layer, branch[B, N, C])`` with the attention branch
            added to the residual stream (``adapter.branch_taps``). Blocks without the module
            are skipped. It does not switch fused attention off by itself.
    """
    handles = []
    saved = []
    try:
        if on_attention is not None or on_pre_attention is not None:
            for module in adapter.attn_modules:
                if module is not None:
                    saved.append((module, module.fused_attn))
                    module.fused_attn = False
        blocks = adapter.blocks
        if "embed" in sites:
            handles.append(
                blocks[0].register_forward_pre_hook(lambda _m, args: on_tokens("embed", 0, args[0]))
            )
        if "mid" in sites:
            if any(t is None for t in adapter.branch_taps):
                raise VitspecError(
                    f"site 'mid' is not available for {adapter.family} blocks; "
                    "use --sites embed,block"
                )
            for layer, (block, tap) in enumerate(zip(blocks, adapter.branch_taps), start=1):
                handles += _mid_hooks(block, tap, layer, on_tokens)
        if "block" in sites:
            for layer, block in enumerate(blocks, start=1):
                handles.append(
                    block.register_forward_hook(
                        lambda _m, _a, out, layer=layer: on_tokens("block", layer, out)
                    )
                )
        if on_attention is not None:
            handles += _input_hooks(adapter.attn_taps, on_attention)
        if on_pre_attention is not None:
            handles += _input_hooks(adapter.pre_attn_taps, on_pre_attention)
        if on_attn_branch is not None:
            handles += _branch_hooks(adapter, on_attn_branch)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, fused in saved:
            module.fused_attn = fused


@contextmanager
def finite_guard(adapter: Adapter) -> Iterator[None]:
    """Raise, in the forward pass, at the first block whose output is not finite (NaN or Inf).

    The check runs on the forward thread, before the next block: the error names the block that
    produced the first non-finite value (or the embedding), not a later consumer of it.
    """

    def check(where: str, x: Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise VitspecError(
                f"NaN or Inf in the output of {where}: the model's activations are not finite "
                "(check the checkpoint and input scaling)",
                exit_code=1,
            )

    blocks = adapter.blocks
    handles = [
        blocks[0].register_forward_pre_hook(
            lambda _m, args: check("the embedding (input of block 1)", args[0])
        )
    ]
    handles += [
        block.register_forward_hook(
            lambda _m, _a, out, layer=layer: check(f"block {layer} (blocks.{layer - 1})", out)
        )
        for layer, block in enumerate(blocks, start=1)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _input_hooks(taps: list, callback: AttentionCallback) -> list:
    """Hooks calling ``callback(layer, input)`` with the forward input of each tap (1-based)."""
    return [
        tap.register_forward_pre_hook(lambda _m, args, layer=layer: callback(layer, args[0]))
        for layer, tap in enumerate(taps, start=1)
        if tap is not None
    ]


def _mid_hooks(block, tap, layer: int, on_tokens: TokenCallback) -> list:
    """Hooks giving ``x + attn_branch(x)``; the block input is held only until the branch is out."""
    held: dict[str, Tensor] = {}

    def keep_input(_m, args):
        held["x"] = args[0]

    def emit(_m, _a, branch):
        on_tokens("mid", layer, held.pop("x") + branch)

    return [block.register_forward_pre_hook(keep_input), tap.register_forward_hook(emit)]


def _branch_hooks(adapter: Adapter, on_attn_branch: BranchCallback) -> list:
    """Pre-hooks on the attention modules (their input) and hooks on the branch taps (output)."""
    handles = []
    for layer, module in enumerate(adapter.attn_modules, start=1):
        if module is not None:
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, layer=layer: on_attn_branch("input", layer, args[0])
                )
            )
    for layer, tap in enumerate(adapter.branch_taps, start=1):
        if tap is not None:
            handles.append(
                tap.register_forward_hook(
                    lambda _m, _a, out, layer=layer: on_attn_branch("output", layer, out)
                )
            )
    return handles
