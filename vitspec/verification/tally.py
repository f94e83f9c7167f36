"""Fixed-size streaming counters of the checks: the verifier's state (mergeable)."""

from __future__ import annotations

import math

PREMISE = "row_stochastic"


class Tally:
    """Fixed-size streaming counters of one (check, layer, head): cases, violations, max slack.

    Example:
        >>> import torch
        >>> from vitspec.verification.checks import Outcome
        >>> t = Tally()
        >>> t.add(Outcome(torch.tensor([0.5, 2.0]), torch.tensor([False, True])))
        >>> t.cases, t.violations, t.max_slack
        (2, 1, 2.0)
    """

    def __init__(self) -> None:
        self.cases = 0
        self.violations = 0
        self.max_slack = 0.0

    def add(self, outcome) -> None:
        slack = outcome.slack.detach().reshape(-1).double()
        if slack.numel() == 0:
            return
        self.cases += slack.numel()
        self.violations += int(outcome.violated.sum())
        slack = slack.nan_to_num(nan=math.inf)
        self.max_slack = max(self.max_slack, float(slack.max()))

    def merge(self, other: Tally) -> None:
        """Fold another tally in: counts add, the largest slack wins."""
        self.cases += other.cases
        self.violations += other.violations
        self.max_slack = max(self.max_slack, other.max_slack)


class Tallies(dict):
    """``(check, layer, head) -> Tally``, created on first use."""

    def add(self, check: str, layer: int | None, head: int | None, outcome) -> None:
        key = (check, layer, head)
        if key not in self:
            self[key] = Tally()
        self[key].add(outcome)

    def merge(self, other: Tallies) -> None:
        """Fold another ``Tallies`` in, key by key."""
        for key, tally in other.items():
            self.setdefault(key, Tally()).merge(tally)
