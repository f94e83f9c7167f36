"""What each metric and site is, in words, for axis labels and captions (no torch).

Axis labels are short (the quantity's unit or kind); panels carry the metric name as title.

The definitions follow docs/metrics.md; the registry (``vitspec metrics``) holds the formulas
the code computes, this module the plain words a figure needs.

Example:
    >>> ylabel("attn_entropy")
    'entropy (nats)'
"""

from __future__ import annotations

#: metric -> (short y-axis label: unit or kind, one-clause definition for captions)
METRICS: dict[str, tuple[str, str]] = {
    "hc_dc_ratio": (
        "||HC|| / ||DC|| (ratio)",
        "||HC[X]||_F / ||DC[X]||_F over all N tokens (prefix included)",
    ),
    "hc_energy": (
        "fraction of energy",
        "||HC[X]||_F^2 / ||X||_F^2 over all N tokens",
    ),
    "patch_cos_abs": (
        "mean |cos|",
        "mean over ordered pairs i != j of |cos(p_i, p_j)|, patch tokens only",
    ),
    "patch_cos": (
        "mean cos",
        "mean over ordered pairs i != j of cos(p_i, p_j) (signed), patch tokens only",
    ),
    "rank_residual": (
        "residual ratio",
        "n13(X - 1 xbar^T) / n13(X) over all N tokens, n13(M) = sqrt(||M||_1 ||M||_inf)",
    ),
    "feat_var": (
        "variance (feature units²)",
        "variance over the h x w patch grid per channel (unbiased), mean over channels",
    ),
    "dlogamp_hf": (
        "Δ log amplitude (nats)",
        "log amplitude of the patch grid's 2-D Fourier transform at the highest diagonal "
        "frequency minus that at DC, mean over channels",
    ),
    "erank": (
        "effective rank",
        "exp of the entropy of the normalised singular values of HC[X]",
    ),
    "cls_dist_cos": (
        "cosine",
        "cosine between the class and the distillation token",
    ),
    "attn_entropy": (
        "entropy (nats)",
        "mean over query rows of -sum_j A_ij log A_ij",
    ),
    "attn_hc_gain": (
        "σ_max (gain)",
        "largest singular value of (I - J) A (I - J)",
    ),
    "attn_cross_layer_sim": (
        "mean cosine",
        "mean over key tokens t of cos(A^l[:, t], A^(l-1)[:, t]), same head",
    ),
    "attn_cos": (
        "mean |cos|",
        "mean over all column pairs (diagonal included) of |cos(A[:, i], A[:, j])|",
    ),
    "gpsa_gate": ("sigmoid(g)", "ConViT's gate sigmoid(g) of each head"),
}

SITES = {
    "embed": "embed (the tokens entering block 1)",
    "mid": "mid (after each block's attention residual, before the MLP)",
    "block": "block (the output of each block)",
    "attn": "attention (post-softmax A of each block)",
}


def ylabel(metric: str) -> str:
    """Short axis label with unit (``pre_`` metrics share it: their panel title says pre_).

    Example:
        >>> ylabel("pre_attn_cos")
        'mean |cos|'
    """
    base = metric.removeprefix("pre_")
    return METRICS.get(base, (base, base))[0]


def define(metric: str) -> str:
    """One-clause definition of ``metric`` for a caption.

    Example:
        >>> define("hc_energy")
        'hc_energy = ||HC[X]||_F^2 / ||X||_F^2 over all N tokens'
    """
    base = metric.removeprefix("pre_")
    text = METRICS.get(base, (base, "see `vitspec metrics`"))[1]
    where = " on AttnScale's pre-scale attention" if metric != base else ""
    return f"{metric} = {text}{where}"


def band_words(band: str, n: str | int) -> str:
    """``"band = ± sd over 450 images"``.

    Example:
        >>> band_words("se", 8)
        'line = mean over 8 images, band = ± se (sd / sqrt(n)) over 8 images'
    """
    what = "sd" if band == "sd" else "se (sd / sqrt(n))"
    return f"line = mean over {n} images, band = ± {what} over {n} images"
