"""An independent float64 numpy forward pass of a timm ViT, from its state dict.

Nothing here imports vitspec or calls the model's modules: together with the per-image metric
definitions of tests/metric_reference.py it is the yardstick the package is measured against.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

# --- a float64 forward pass of a timm VisionTransformer, from its state dict -------------------


def _layer_norm(x, weight, bias, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def vit_forward(
    sd: dict, image: np.ndarray, *, patch: int, heads: int, num_prefix: int, eps: float = 1e-6
):
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
