"""The plain twins of the fused decode layers (:mod:`model.kernels.triton_fused` on a GPU,
:mod:`model.kernels.cpu_fused` on the CPU): the same math in plain torch, compared with them in tests.

Each does its sums in float32 and rounds once, at the end, except where the model's plain blocks round too
(the normalized rows, the router's logits), so that the experts and the top-k see the same values.
"""

from __future__ import annotations

import torch


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm of :class:`model.gpt_oss.RMSNorm`, rounded to `x`'s dtype."""
    t = x.float()
    return (t * torch.rsqrt(t.pow(2).mean(dim=-1, keepdim=True) + eps) * scale).to(x.dtype)


def norm_qkv_rope_reference(
    x: torch.Tensor,
    norm_scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain twin of the fused ``norm_qkv_rope``: float32 products of the rounded norm, one rounding at the
    end."""
    qkv = _rms_norm(x, norm_scale, eps).float() @ weight.float().T + bias.float()
    dim = weight.shape[0] // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)

    def rotate(t: torch.Tensor, n: int) -> torch.Tensor:
        t1, t2 = t.unflatten(-1, (n, dim)).chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((t1 * c - t2 * s, t2 * c + t1 * s), dim=-1).to(x.dtype)

    return rotate(q, heads), rotate(k, kv_heads), v.unflatten(-1, (kv_heads, dim)).to(x.dtype)


def norm_qkv_rope_store_reference(
    x: torch.Tensor,
    norm_scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Plain twin of the fused ``norm_qkv_rope_store``: :func:`norm_qkv_rope_reference`, then k and v
    written token by token at their slots (none where the slot is negative), cast to the cache's dtype.
    Returns q."""
    q, k, v = norm_qkv_rope_reference(x, norm_scale, eps, weight, bias, cos, sin, heads, kv_heads)
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot] = k[token]
            v_cache[slot] = v[token]
    return q


def out_residual_reference(
    a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Plain twin of the fused ``out_residual``, in float32, rounded once."""
    return (x.float() + a.float() @ weight.float().T + bias.float()).to(x.dtype)


def route_reference(
    x: torch.Tensor,
    norm_scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain twin of the fused ``route``: float32 logits of the rounded norm, rounded to `x`'s dtype, top-k
    (ties to the lowest expert: a stable sort), softmax over the k."""
    t = _rms_norm(x, norm_scale, eps)
    logits = (t.float() @ weight.float().T + bias.float()).to(x.dtype).float()
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    values, indices = values[:, :top_k], indices[:, :top_k]
    return t, indices, torch.softmax(values, dim=-1).to(x.dtype)
