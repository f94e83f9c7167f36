"""Fold the shards of one ``vitspec verify`` run into the folder one process would have written.

``verify --shard K/N`` (and every rank under ``torchrun``) saves its verifier's fixed-size state
(:class:`~vitspec.verification.state.VerifierState`, ``state.pt``) beside verify.csv and
verify.json. :func:`merge_verify_parts` refuses shards of different runs with the rules of
:func:`vitspec.shards.check_shards` (plus the checks' own options: seed, max_steps, tolerances),
folds the states in shard order and tabulates them exactly as a one-process run does: the same
verify.csv (counts and largest slacks are exact under the merge), the same verdicts, and the
figures' means to float64 round-off.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from vitspec.errors import VitspecError
from vitspec.shards import SAME, check_shards, merged_info
from vitspec.verification.result import VerifyResult, summarise, table
from vitspec.verification.state import VerifierState

__all__ = ["VERIFY_GEOMETRY", "VERIFY_SAME", "merge_verify_parts", "shard_state", "unavailable"]

#: verify.json fields every shard of one verify run shares (dotted paths), and those of the
#: images' geometry (compared among the shards that saw images)
VERIFY_SAME = (*SAME, "seed", "max_steps", "tolerances")
VERIFY_GEOMETRY = ("stages", "tokens")

SHAPES = "checks at layer "  # the unavailable entries the verifier's state adds


def shard_state(state: VerifierState) -> dict:
    """A verify shard's ``state.pt`` content.

    Example:
        >>> s = VerifierState(depth=1, max_steps=4, seed=0, branch_reasons={1: None})
        >>> sorted(shard_state(s))
        ['verifier']
    """
    return {"verifier": state.plain()}


def unavailable(engine: dict[str, str], state: VerifierState) -> dict[str, str]:
    """verify.json's ``unavailable``: the sites the model lacks (the engine's) and the layers
    whose attention the checks do not apply to (the state's).

    Example:
        >>> s = VerifierState(depth=1, max_steps=4, seed=0, branch_reasons={1: None})
        >>> s.note("shapes", 1, "not square", batch=0)
        >>> unavailable({"pattern": "none"}, s)
        {'pattern': 'none', 'checks at layer 1': 'not square'}
    """
    out = {k: v for k, v in engine.items() if not k.startswith(SHAPES)}
    out.update({f"{SHAPES}{layer}": why for layer, why in state.shapes.items()})
    return out


def merge_verify_parts(parts: Sequence[tuple[dict, dict]]) -> VerifyResult:
    """``(verify.json, state)`` of every shard -> the one-process :class:`VerifyResult`.

    Example:
        >>> merge_verify_parts([(info0, state0), (info1, state1)])  # doctest: +SKIP
    """
    infos = [info for info, _ in parts]
    check_shards(infos, VERIFY_SAME, VERIFY_GEOMETRY)
    for info, state in parts:
        if "verifier" not in state:
            where = info.get("_folder", f"rank {info['shard']['index']}")
            raise VitspecError(f"{where} holds no verifier state: it is not a verify shard")
    order = sorted(range(len(parts)), key=lambda i: infos[i]["shard"]["index"])
    merged = VerifierState.from_plain(parts[order[0]][1]["verifier"])
    for i in order[1:]:
        merged.merge_state(VerifierState.from_plain(parts[i][1]["verifier"]).state())
    if not merged.tallies:
        raise VitspecError(
            f"no attention matrix was captured from {infos[0]['model']} in any shard: "
            "its blocks expose no square post-softmax attention"
        )
    first = infos[order[0]]
    ids = {k: first[k] for k in ("run", "model", "checkpoint")}
    df = table(merged.tallies, ids, merged.not_applicable())
    info = merged_info([infos[i] for i in order], ("unavailable",))
    info.update(
        num_heads=merged.num_heads,
        tokens=merged.n_tokens,
        stages=next((p["stages"] for p in infos if p.get("stages")), []),
        unavailable=unavailable(info["unavailable"], merged),
        consistency=merged.consistency(),
        residual_rate=merged.residual_note(),
        summary=summarise(df),
    )
    data = {k: pd.DataFrame(v) for k, v in merged.figure_data().items()}
    return VerifyResult(df, info, data)
