"""Streaming metrics: the registry of every metric in docs/metrics.md and accumulators.

Importing this package registers the built-in metrics (see :mod:`vitspec.metrics.registry`).
"""

from vitspec.metrics.registry import (
    KIND_SITES,
    KINDS,
    NEEDS,
    MetricSpec,
    get_metric,
    list_metrics,
    register_metric,
)
from vitspec.metrics.streaming import Moments

__all__ = [
    "KIND_SITES",
    "KINDS",
    "NEEDS",
    "MetricSpec",
    "Moments",
    "get_metric",
    "list_metrics",
    "register_metric",
]
