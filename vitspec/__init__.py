"""vitspec: Fourier-domain oversmoothing measures for Vision Transformers.

The public API is loaded lazily so that ``import vitspec`` stays light.

Example:
    >>> import vitspec
    >>> result = vitspec.analyze("deit_small", random_init=True, num_images=4)  # doctest: +SKIP
    >>> result.metrics.head()  # doctest: +SKIP
"""

import importlib

__version__ = "0.1.0"

_API = {
    "analyze": "vitspec.analysis",
    "analyze_checkpoints": "vitspec.sweep",
    "compare": "vitspec.comparison",
    "ComparisonResult": "vitspec.comparison",
    "Result": "vitspec.results",
    "VitspecError": "vitspec.errors",
    "list_metrics": "vitspec.metrics",
    "report": "vitspec.reporting",
    "verify": "vitspec.verification",
    "VerifyResult": "vitspec.verification",
}


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'vitspec' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
