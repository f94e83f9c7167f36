"""An independent float64 numpy implementation of shared/metrics.md and of a timm ViT forward.

Nothing here imports vitspec: it is the yardstick the package is measured against. It is written
for clarity, not speed: explicit DFT matrices, explicit Gram matrices, full SVDs.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf


def dft(n: int) -> np.ndarray:
    """Unitary DFT matrix F[k, j] = exp(-2 pi i k j / n) / sqrt(n)."""
    k = np.arange(n)
    return np.exp(-2j * np.pi * np.outer(k, k) / n) / np.sqrt(n)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def n13(m: np.ndarray) -> float:
    return np.sqrt(np.abs(m).sum(axis=0).max() * np.abs(m).sum(axis=1).max())


def patch_grid(x: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """(C, h, w) patch grid of one image's tokens."""
    h, w = grid
    return x[num_prefix:].T.reshape(x.shape[1], h, w)


def dlogamp(x: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> np.ndarray:
    h, w = grid
    g = patch_grid(x, num_prefix, grid)
    fh, fw = np.sqrt(h) * dft(h), np.sqrt(w) * dft(w)  # non-normalised 2-D DFT, like fft2
    amp = np.stack([fh @ g[c] @ fw.T for c in range(g.shape[0])])
    log_amp = np.log(np.abs(amp) + 1e-6).mean(axis=0)
    log_amp = np.roll(log_amp, (h // 2, w // 2), axis=(0, 1))
    d = np.array([log_amp[i, i] for i in range(h // 2, min(h, w))])
    return d - d[0]


def token_metrics(x: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> dict[str, float]:
    """Every token metric of one image's tokens x (N x C)."""
    n = x.shape[0]
    dc = np.ones((n, 1)) @ x.mean(axis=0, keepdims=True)
    hc = x - dc
    p = _unit_rows(x[num_prefix:])
    gram = p @ p.T
    off = ~np.eye(len(p), dtype=bool)
    s = np.linalg.svd(hc, compute_uv=False)
    prob = s / s.sum()
    prob = prob[prob > 0]
    g = patch_grid(x, num_prefix, grid)
    return {
        "hc_dc_ratio": np.linalg.norm(hc) / np.linalg.norm(dc),
        "hc_energy": np.linalg.norm(hc) ** 2 / np.linalg.norm(x) ** 2,
        "patch_cos_abs": np.abs(gram[off]).mean(),
        "patch_cos": gram[off].mean(),
        "rank_residual": n13(hc) / n13(x),
        "feat_var": g.reshape(g.shape[0], -1).var(axis=1, ddof=1).mean(),
        "dlogamp_hf": dlogamp(x, num_prefix, grid)[-1],
        "erank": np.exp(-(prob * np.log(prob)).sum()),
    }


def token_curves(x: np.ndarray, num_prefix: int, grid: tuple[int, int]) -> dict[str, np.ndarray]:
    fx = dft(x.shape[0]) @ x
    return {
        "dlogamp": dlogamp(x, num_prefix, grid),
        "token_spectrum": (np.abs(fx) ** 2).sum(axis=1) / np.linalg.norm(x) ** 2,
    }


def attn_metrics(a: np.ndarray, prev: np.ndarray | None) -> dict[str, float]:
    """Every attention metric of one head's attention a (N x N); prev: previous layer's head."""
    n = a.shape[0]
    centre = np.eye(n) - np.ones((n, n)) / n
    cols = _unit_rows(a.T)
    out = {
        "attn_entropy": -(a * np.log(a)).sum(axis=1).mean(),
        "attn_hc_gain": np.linalg.svd(centre @ a @ centre, compute_uv=False)[0],
        "attn_cos": np.abs(cols @ cols.T).mean(),
    }
    if prev is not None:
        out["attn_cross_layer_sim"] = (cols * _unit_rows(prev.T)).sum(axis=1).mean()
    return out


def attn_spectrum(a: np.ndarray) -> np.ndarray:
    f = dft(a.shape[0])
    return np.linalg.norm(f @ a @ f.conj().T, axis=1)


# --- a float64 forward pass of a timm VisionTransformer, from its state dict -------------------

def _layer_norm(x, weight, bias, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def vit_forward(sd: dict, image: np.ndarray, *, patch: int, heads: int, num_prefix: int,
                eps: float = 1e-6):
    """Tokens at every site and attention of every block, for one image (3 x H x W).

    Returns:
        (sites, attention): sites[(site, layer)] = N x C tokens, attention[layer] = H x N x N.
    """
    w = sd["patch_embed.proj.weight"]
    c, _, ph, pw = w.shape
    _, hh, ww = image.shape
    h, g = hh // ph, ww // pw
    patches = image.reshape(3, h, ph, g, pw).transpose(1, 3, 0, 2, 4).reshape(h * g, -1)
    x = patches @ w.reshape(c, -1).T + sd["patch_embed.proj.bias"]
    prefix = [sd[k][0] for k in ("cls_token", "dist_token") if k in sd]
    x = np.concatenate(prefix + [x]) + sd["pos_embed"][0]
    assert x.shape[0] == num_prefix + h * g
    sites, attention = {("embed", 0): x}, {}
    layer = 1
    while f"blocks.{layer - 1}.norm1.weight" in sd:
        p = f"blocks.{layer - 1}."
        y = _layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        n = x.shape[0]
        q, k, v = qkv.reshape(n, 3, heads, c // heads).transpose(1, 2, 0, 3)
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(c // heads)
        logits -= logits.max(axis=-1, keepdims=True)
        a = np.exp(logits)
        a /= a.sum(axis=-1, keepdims=True)
        attention[layer] = a
        o = (a @ v).transpose(1, 0, 2).reshape(n, c)
        x = x + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        sites[("mid", layer)] = x
        y = _layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        m = _gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + m @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        sites[("block", layer)] = x
        layer += 1
    return sites, attention
