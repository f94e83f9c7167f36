"""Independent float64 NumPy references for every metric of shared/metrics.md, plus test inputs.

Written directly from the contract, one image (or one head) at a time, with explicit matrices:
the DFT matrix F is built with np.exp (no FFT), J is an explicit matrix, cosines come from explicit
Gram matrices and singular values from np.linalg.svd. Nothing here imports vitspec.
"""

from __future__ import annotations

import numpy as np
import torch

# ----------------------------------------------------------------------------- building blocks


def dft(n: int) -> np.ndarray:
    """Unitary DFT matrix, F[k, j] = exp(-2 pi i k j / n) / sqrt(n)."""
    k = np.arange(n)
    return np.exp(-2j * np.pi * np.outer(k, k) / n) / np.sqrt(n)


def centring(n: int) -> np.ndarray:
    """I - J with J = (1/n) 1 1^T."""
    return np.eye(n) - np.full((n, n), 1.0 / n)


def cos_matrix(vectors: np.ndarray) -> np.ndarray:
    """Explicit cosine matrix of the rows of ``vectors`` ([n, d]); a zero row has cosine 0."""
    gram = vectors @ vectors.T
    norms = np.sqrt(np.diag(gram))
    den = np.outer(norms, norms)
    return np.divide(gram, den, out=np.zeros_like(gram), where=den > 0)


def patch_grid(x: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """(C, h, w) grid from raster-ordered patch tokens: grid[c, r, q] = X[P + r*w + q, c]."""
    h, w = grid
    p = x[num_prefix:]
    out = np.empty((p.shape[1], h, w))
    for r in range(h):
        for q in range(w):
            out[:, r, q] = p[r * w + q]
    return out


def n13(m: np.ndarray) -> float:
    return float(np.sqrt(np.abs(m).sum(axis=0).max() * np.abs(m).sum(axis=1).max()))


# ----------------------------------------------------------------------------- token metrics
# each: (X [N, C] float64, num_prefix, grid) -> float or 1-D array


def hc_dc_ratio(x, num_prefix, grid):
    j = np.full((len(x), len(x)), 1.0 / len(x))
    return np.linalg.norm(x - j @ x) / np.linalg.norm(j @ x)


def hc_energy(x, num_prefix, grid):
    j = np.full((len(x), len(x)), 1.0 / len(x))
    return np.linalg.norm(x - j @ x) ** 2 / np.linalg.norm(x) ** 2


def _offdiag_mean(c: np.ndarray) -> float:
    g = len(c)
    return float(c[~np.eye(g, dtype=bool)].mean())


def patch_cos_abs(x, num_prefix, grid):
    return _offdiag_mean(np.abs(cos_matrix(x[num_prefix:])))


def patch_cos(x, num_prefix, grid):
    return _offdiag_mean(cos_matrix(x[num_prefix:]))


def rank_residual(x, num_prefix, grid):
    xbar = x.mean(axis=0)
    return n13(x - np.outer(np.ones(len(x)), xbar)) / n13(x)


def feat_var(x, num_prefix, grid):
    g = patch_grid(x, num_prefix, grid)
    return float(np.mean([np.var(g[c].ravel(), ddof=1) for c in range(len(g))]))


def dlogamp(x, num_prefix, grid):
    h, w = grid
    g = patch_grid(x, num_prefix, grid)
    fh, fw = dft(h) * np.sqrt(h), dft(w) * np.sqrt(w)  # unnormalised, like fft2's default
    amp = np.stack([np.abs(fh @ g[c] @ fw.T) for c in range(len(g))])
    lg = np.log(amp + 1e-6).mean(axis=0)
    lg = np.roll(lg, (h // 2, w // 2), axis=(0, 1))
    d = np.array([lg[i, i] for i in range(h // 2, min(h, w))])
    return d - d[0]


def dlogamp_hf(x, num_prefix, grid):
    return dlogamp(x, num_prefix, grid)[-1]


def erank(x, num_prefix, grid):
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def token_spectrum(x, num_prefix, grid):
    fx = dft(len(x)) @ x
    return (np.abs(fx) ** 2).sum(axis=1) / np.linalg.norm(x) ** 2


# ----------------------------------------------------------------------------- attention metrics
# each: (A [N, N] float64, prev [N, N] or None) -> float or 1-D array


def attn_entropy(a, prev):
    logs = np.log(np.where(a > 0, a, 1.0))
    return float((-(a * logs).sum(axis=1)).mean())


def attn_hc_gain(a, prev):
    c = centring(len(a))
    return float(np.linalg.svd(c @ a @ c, compute_uv=False)[0])


def attn_cross_layer_sim(a, prev):
    vals = []
    for t in range(len(a)):
        x, y = a[:, t], prev[:, t]
        den = np.linalg.norm(x) * np.linalg.norm(y)
        vals.append(x @ y / den if den > 0 else 0.0)
    return float(np.mean(vals))


def attn_cos(a, prev):
    return float(np.abs(cos_matrix(a.T)).mean())


def attn_spectrum(a, prev):
    f = dft(len(a))
    s = f @ a @ f.conj().T
    return np.linalg.norm(s, axis=1)


def cls_dist_cos(x, num_prefix, grid):
    """Models with a class and a distillation token: cos of tokens 0 and 1 (float64)."""
    assert num_prefix == 2
    a, b = x[0], x[1]
    return float(a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b)))


TOKEN = {
    f.__name__: f
    for f in (
        hc_dc_ratio,
        hc_energy,
        patch_cos_abs,
        patch_cos,
        rank_residual,
        feat_var,
        dlogamp_hf,
        erank,
        dlogamp,
        token_spectrum,
    )
}
ATTN = {
    f.__name__: f
    for f in (attn_entropy, attn_hc_gain, attn_cross_layer_sim, attn_cos, attn_spectrum)
}
#: token metrics defined only for 2 prefix tokens (class, distillation): not in TOKEN, which the
#: contract test applies to every model
PREFIX2 = {"cls_dist_cos": cls_dist_cos}
REFERENCE = {**TOKEN, **PREFIX2, **ATTN}


def reference_tokens(name, tokens, num_prefix, grid) -> np.ndarray:
    """Batched reference for a token metric: [B] or [B, K]."""
    x = np.asarray(tokens.detach().cpu().to(torch.float64))
    fn = {**TOKEN, **PREFIX2}[name]
    return np.stack([np.asarray(fn(xi, num_prefix, grid)) for xi in x])


def reference_attn(name, attn, prev=None) -> np.ndarray:
    """Batched reference for an attention metric: [B, H] or [B, H, N]."""
    a = np.asarray(attn.detach().cpu().to(torch.float64))
    p = None if prev is None else np.asarray(prev.detach().cpu().to(torch.float64))
    return np.stack(
        [
            np.stack(
                [
                    np.asarray(ATTN[name](a[b, h], None if p is None else p[b, h]))
                    for h in range(a.shape[1])
                ]
            )
            for b in range(a.shape[0])
        ]
    )


# ----------------------------------------------------------------------------- test inputs


def softmax_attention(shape, scale, seed) -> torch.Tensor:
    """softmax(scale * randn) over the last axis, float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def deit_attention(batch: int = 4, seed: int = 0):
    """Post-softmax attention [L, B, H, 65, 65] and block outputs [L, B, 65, 192] (float32)
    of a random-init DeiT-tiny on 64x64 inputs with 8x8 patches (grid 8 x 8, one class token)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8
    ).eval()
    attn, tokens, handles = [], [], []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(
            blk.attn.attn_drop.register_forward_hook(lambda m, i, o: attn.append(i[0].detach()))
        )
        handles.append(blk.register_forward_hook(lambda m, i, o: tokens.append(o.detach())))
    g = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            model(torch.randn(batch, 3, 64, 64, generator=g))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(attn), torch.stack(tokens)
