"""The rest of a decode layer in Triton, three launches: what the attention and MoE kernels do not cover.
With the attention's one launch (its K/V store here, its merge in its split launch) and the experts' two (the
residual added in the second), a decode layer is six launches.

A decode step of a gpt-oss layer is mostly matrix-vector products over a few rows; run as the model writes
them (:mod:`model.gpt_oss`), each RMSNorm, projection, rotation, residual add and routing step is several
small kernels. Here they are fused around the weight reads:

* :func:`norm_qkv_rope`: the attention's RMSNorm, the QKV projection with its bias, and YaRN RoPE on the
  query and key heads, writing q, k and v. A program owns pairs of rows ``(j, j + head_dim/2)`` of a head,
  the two halves gpt-oss rotates together, so the rotation is local to its registers.
  :func:`norm_qkv_rope_store`, the same kernel for a decode step, writes k and v straight into the paged
  cache at each token's slot, so the attention needs no store launch of its own.
* :func:`out_residual`: the output projection, its bias and the residual add.
* :func:`route`: the MLP's RMSNorm (whose output the experts read), the router's GEMV and bias, the top-k
  experts and the softmax over their k logits, one program per token.

The projections stream each weight row once for all the step's rows (up to :data:`MAX_TOKENS`): below 16
rows as broadcast multiply-adds, from 16 on as ``tl.dot`` (which needs at least 16 rows). Sums are float32;
the normalized activations and the router's logits are rounded to the activation dtype as the plain path
rounds them (the experts and the top-k see the same values), every other result is rounded once, at its
store.

Twins: :mod:`model.kernels.fused_reference`, the same math in plain torch (shared with the CPU's fused
layer), compared in tests under the Triton interpreter on a CPU and on a GPU where there is one; the model's
own blocks are the spec the fused layer is compared against end to end.
:class:`TritonFusedLayers` is the :class:`~model.kernels.Kernels` seam's implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.batch import AttentionMetadata, KVCache
from model.kernels import AttentionWeights, MLPWeights
from model.kernels.attention import fused_attention
from model.kernels.triton_attention import TritonAttention
from model.kernels.triton_moe import experts_triton, experts_triton_residual

# Rows a step may have for the fused kernels: the decode graphs' largest default bucket (a short prompt chunk
# runs them too). Past it a step is a prompt's, whose projections are matrix products cuBLAS does better.
MAX_TOKENS = 64
# Elements of a broadcast multiply-add tile ([rows, weight rows, columns]) held in registers at once.
_FMA_TILE = 8192


@triton.jit
def _inverse_rms(x_ptr, x_stride, T, eps, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_T] float32 1 / sqrt(mean(x²) + eps) of each of the T rows of x."""
    tokens = tl.arange(0, BLOCK_T)
    squares = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = (tokens < T)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + tokens[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        squares += tl.sum(x * x, axis=1)
    return tl.rsqrt(squares / K + eps)


@triton.jit
def _rows_times_weight(
    x_ptr,
    x_stride,
    T,
    inverse_rms,  # [BLOCK_T] float32, read when NORM
    norm_ptr,  # [K] float32 RMSNorm scale, read when NORM
    w_ptr,  # [N, K] row-major
    rows,  # [BLOCK_N] rows of w
    row_mask,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """[BLOCK_T, BLOCK_N] float32: each of the T rows of x (RMS-normalized and rounded to x's dtype when
    NORM, as the plain RMSNorm returns them) times each of the weight `rows`."""
    tokens = tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    w_rows = rows.to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(
            x_ptr + tokens[:, None] * x_stride + cols[None, :],
            mask=token_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if NORM:
            scale = tl.load(norm_ptr + cols, mask=col_mask, other=0.0)
            x = ((x.to(tl.float32) * inverse_rms[:, None]) * scale[None, :]).to(x_ptr.dtype.element_ty)
        w = tl.load(
            w_ptr + w_rows[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )
        if USE_DOT:
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _norm_qkv_rope(
    x_ptr,  # [T, H] residual stream
    norm_ptr,  # [H] float32
    w_ptr,  # [(HQ + 2 KVH) D, H]
    b_ptr,  # [(HQ + 2 KVH) D]
    cos_ptr,  # [T, D/2] float32, the concentration included
    sin_ptr,  # [T, D/2] float32
    q_ptr,  # [T, HQ, D]
    k_ptr,  # [T, KVH, D], written unless STORE
    v_ptr,  # [T, KVH, D], written unless STORE
    k_cache_ptr,  # [slots, KVH, D], written when STORE
    v_cache_ptr,  # [slots, KVH, D], written when STORE
    slots_ptr,  # [T] int: each token's slot in the cache, < 0 for none; read when STORE
    cache_stride_slot,
    cache_stride_head,
    T,
    eps,
    H: tl.constexpr,
    HQ: tl.constexpr,
    KVH: tl.constexpr,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE: tl.constexpr,  # k and v into the cache at their slots rather than into k_ptr and v_ptr
) -> None:
    HALF = D // 2
    # Pair p is row j of head h's first half and its partner j + D/2: p = h * D/2 + j.
    pairs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pair_mask = pairs < (HQ + 2 * KVH) * HALF
    head = pairs // HALF
    j = pairs % HALF
    first = head * D + j
    second = first + HALF
    inverse_rms = _inverse_rms(x_ptr, H, T, eps, H, BLOCK_T, BLOCK_K)
    a1 = _rows_times_weight(
        x_ptr,
        H,
        T,
        inverse_rms,
        norm_ptr,
        w_ptr,
        first,
        pair_mask,
        H,
        BLOCK_T,
        BLOCK_P,
        BLOCK_K,
        True,
        USE_DOT,
        PRECISION,
    )
    a2 = _rows_times_weight(
        x_ptr,
        H,
        T,
        inverse_rms,
        norm_ptr,
        w_ptr,
        second,
        pair_mask,
        H,
        BLOCK_T,
        BLOCK_P,
        BLOCK_K,
        True,
        USE_DOT,
        PRECISION,
    )
    a1 += tl.load(b_ptr + first, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    a2 += tl.load(b_ptr + second, mask=pair_mask, other=0.0).to(tl.float32)[None, :]

    tokens = tl.arange(0, BLOCK_T)
    token_mask = tokens < T
    table = tokens[:, None] * HALF + j[None, :]
    table_mask = token_mask[:, None] & pair_mask[None, :]
    cos = tl.load(cos_ptr + table, mask=table_mask, other=0.0)
    sin = tl.load(sin_ptr + table, mask=table_mask, other=0.0)
    rotated = (head < HQ + KVH)[None, :]  # queries and keys; values are not rotated
    r1 = tl.where(rotated, a1 * cos - a2 * sin, a1)
    r2 = tl.where(rotated, a2 * cos + a1 * sin, a2)

    dtype = q_ptr.dtype.element_ty
    _store_heads(q_ptr, r1, r2, head, j, tokens * (HQ * D), D, table_mask, 0, HQ, D, dtype)
    if STORE:
        slot = tl.load(slots_ptr + tokens, mask=token_mask, other=-1).to(tl.int64)
        into = slot * cache_stride_slot
        stride = cache_stride_head
        cache_mask = table_mask & (slot >= 0)[:, None]
        _store_heads(k_cache_ptr, r1, r2, head, j, into, stride, cache_mask, HQ, KVH, D, dtype)
        _store_heads(v_cache_ptr, r1, r2, head, j, into, stride, cache_mask, HQ + KVH, KVH, D, dtype)
    else:
        rows = tokens * (KVH * D)
        _store_heads(k_ptr, r1, r2, head, j, rows, D, table_mask, HQ, KVH, D, dtype)
        _store_heads(v_ptr, r1, r2, head, j, rows, D, table_mask, HQ + KVH, KVH, D, dtype)


@triton.jit
def _store_heads(
    ptr,
    r1,
    r2,
    head,
    j,
    rows,  # [BLOCK_T] offset of each token's row in `ptr`
    head_stride,
    mask,
    FIRST: tl.constexpr,
    COUNT: tl.constexpr,
    D: tl.constexpr,
    dtype: tl.constexpr,
):
    """Store the pairs of heads FIRST .. FIRST + COUNT - 1 of the projection into `ptr` (a token's row at
    `rows`, its heads `head_stride` apart), rounded to `dtype` (the activations') first: a cache of
    another dtype holds what the attention seam's store would have cast from the rounded k and v."""
    mine = (head >= FIRST) & (head < FIRST + COUNT)
    column = tl.where(mine, head - FIRST, 0) * head_stride + j
    offsets = rows[:, None] + column[None, :]
    mask = mask & mine[None, :]
    tl.store(ptr + offsets, r1.to(dtype).to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + offsets + D // 2, r2.to(dtype).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _out_residual(
    a_ptr,  # [T, K] attention output
    w_ptr,  # [N, K]
    b_ptr,  # [N]
    x_ptr,  # [T, N] residual stream
    out_ptr,  # [T, N]
    T,
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
) -> None:
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc = _rows_times_weight(
        a_ptr,
        K,
        T,
        0.0,
        a_ptr,
        w_ptr,
        rows,
        row_mask,
        K,
        BLOCK_T,
        BLOCK_N,
        BLOCK_K,
        False,
        USE_DOT,
        PRECISION,
    )
    tokens = tl.arange(0, BLOCK_T)
    offsets = tokens[:, None] * N + rows[None, :]
    mask = (tokens < T)[:, None] & row_mask[None, :]
    acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _route(
    x_ptr,  # [T, H] residual stream
    norm_ptr,  # [H] float32
    w_ptr,  # [E, H] router
    b_ptr,  # [E]
    t_ptr,  # [T, H] out: the normalized activations
    ids_ptr,  # [T, TOP_K] int64 out: experts, by falling logit
    weights_ptr,  # [T, TOP_K] out: softmax over the selected logits
    eps,
    H: tl.constexpr,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_TOP: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> None:
    token = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + token * H
    t_row = t_ptr + token * H
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + cols, mask=cols < H, other=0.0).to(tl.float32)
        squares += x * x
    inverse_rms = tl.rsqrt(tl.sum(squares, axis=0) / H + eps)
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < E
    logits = tl.zeros([BLOCK_E], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < H
        x = tl.load(x_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        scale = tl.load(norm_ptr + cols, mask=col_mask, other=0.0)
        t = ((x * inverse_rms) * scale).to(t_ptr.dtype.element_ty)
        tl.store(t_row + cols, t, mask=col_mask)
        w = tl.load(
            w_ptr + experts[:, None] * H + cols[None, :],
            mask=expert_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        logits += tl.sum(w.to(tl.float32) * t.to(tl.float32)[None, :], axis=1)
    logits += tl.load(b_ptr + experts, mask=expert_mask, other=0.0).to(tl.float32)
    # The plain router's logits are in the activation dtype: the top-k picks among the same values.
    logits = logits.to(t_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(expert_mask, logits, float("-inf"))
    slots = tl.arange(0, BLOCK_TOP)
    top = tl.full([BLOCK_TOP], float("-inf"), dtype=tl.float32)
    ids = tl.zeros([BLOCK_TOP], dtype=tl.int64)
    for slot in tl.static_range(TOP_K):
        best = tl.max(logits, axis=0)
        chosen = tl.min(tl.where(logits == best, experts, BLOCK_E), axis=0)  # ties: the lowest expert
        top = tl.where(slots == slot, best, top)
        ids = tl.where(slots == slot, chosen.to(tl.int64), ids)
        logits = tl.where(experts == chosen, float("-inf"), logits)
    probs = tl.exp(top - tl.max(top, axis=0))  # the empty slots past TOP_K weigh exp(-inf) = 0
    probs = probs / tl.sum(probs, axis=0)
    slot_mask = slots < TOP_K
    tl.store(ids_ptr + token * TOP_K + slots, ids, mask=slot_mask)
    tl.store(weights_ptr + token * TOP_K + slots, probs.to(weights_ptr.dtype.element_ty), mask=slot_mask)


def _tiles(tokens: int, width: int, k: int) -> tuple[int, int, bool]:
    """(BLOCK_T, BLOCK_K, use tl.dot) for `tokens` rows against `width` weight rows per program."""
    block_t = triton.next_power_of_2(tokens)
    if block_t >= 16:
        return block_t, min(64, triton.next_power_of_2(k)), True
    block_k = max(16, min(256, _FMA_TILE // (block_t * width), triton.next_power_of_2(k)))
    return block_t, block_k, False


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 weights (tests, references) in full precision, not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_rows(x: torch.Tensor) -> None:
    if not 0 < x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"the fused decode kernels take 1 to {MAX_TOKENS} rows, got {x.shape[0]}")


# Pairs of rows (one of each half of a head) per QKV program: 16 is tl.dot's least width.
BLOCK_PAIRS = 16
# Hidden columns per output-projection program.
BLOCK_OUT = 16


def norm_qkv_rope(
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
    """q `[T, heads, D]`, k and v `[T, kv_heads, D]` in `x`'s dtype: ``RMSNorm(x) @ weight.T + bias``, split
    and with q and k rotated by `cos`/`sin` `[T, D/2]` (half-split pairs). `x [T, H]`, T up to
    :data:`MAX_TOKENS`."""
    tokens, dim = _check_qkv(x, weight, cos, heads, kv_heads)
    k = torch.empty(tokens, kv_heads, dim, dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    q = _launch_norm_qkv_rope(x, norm_scale, eps, weight, bias, cos, sin, heads, kv_heads, (k, v), None)
    return q, k, v


def norm_qkv_rope_store(
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
    """:func:`norm_qkv_rope` whose k and v go straight into `k_cache`/`v_cache` ``[slots, kv_heads, D]`` at
    ``slot_mapping [T]`` (a negative slot: not stored), rounded to `x`'s dtype and cast to the cache's, as
    the attention seam's store writes them: one launch for both. Returns q `[T, heads, D]`."""
    _check_qkv(x, weight, cos, heads, kv_heads)
    if k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride() or k_cache.shape[1] != kv_heads:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)}: not one layout of heads")
    if slot_mapping.shape != (x.shape[0],):
        raise ValueError(f"slot mapping {tuple(slot_mapping.shape)} does not fit x {tuple(x.shape)}")
    caches = (k_cache, v_cache, slot_mapping)
    return _launch_norm_qkv_rope(x, norm_scale, eps, weight, bias, cos, sin, heads, kv_heads, None, caches)


def _check_qkv(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, heads: int, kv_heads: int
) -> tuple[int, int]:
    """(rows, head_dim), or ValueError where the shapes do not fit."""
    _check_rows(x)
    tokens, hidden = x.shape
    dim = weight.shape[0] // (heads + 2 * kv_heads)
    if (
        dim * (heads + 2 * kv_heads) != weight.shape[0]
        or weight.shape[1] != hidden
        or cos.shape != (tokens, dim // 2)
    ):
        raise ValueError(
            f"qkv weight {tuple(weight.shape)}, cos {tuple(cos.shape)} do not fit x {tuple(x.shape)}"
        )
    return tokens, dim


def _launch_norm_qkv_rope(
    x: torch.Tensor,
    norm_scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    kv: tuple[torch.Tensor, torch.Tensor] | None,
    caches: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """q, with k and v written into `kv` or, with `caches` (k cache, v cache, slots), into the caches."""
    tokens, hidden = x.shape
    dim = weight.shape[0] // (heads + 2 * kv_heads)
    x = x.contiguous()
    q = torch.empty(tokens, heads, dim, dtype=x.dtype, device=x.device)
    if caches is None:
        assert kv is not None
        k, v = kv
        k_cache, v_cache, slots, strides = q, q, q, (0, 0)  # not read: STORE is off
    else:
        k, v = q, q  # not written: STORE is on
        k_cache, v_cache, slots = caches
        strides = (k_cache.stride(0), k_cache.stride(1))
    block_t, block_k, use_dot = _tiles(tokens, BLOCK_PAIRS, hidden)
    pairs = (heads + 2 * kv_heads) * dim // 2
    _norm_qkv_rope[(triton.cdiv(pairs, BLOCK_PAIRS),)](
        x,
        norm_scale,
        weight,
        bias,
        cos.contiguous(),
        sin.contiguous(),
        q,
        k,
        v,
        k_cache,
        v_cache,
        slots,
        *strides,
        tokens,
        eps,
        hidden,
        heads,
        kv_heads,
        dim,
        block_t,
        BLOCK_PAIRS,
        block_k,
        use_dot,
        _precision(weight.dtype),
        caches is not None,
    )
    return q


def out_residual(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + a @ weight.T + bias`` in `x`'s dtype: `a [T, K]`, `weight [N, K]`, `x [T, N]`, T up to
    :data:`MAX_TOKENS`."""
    _check_rows(x)
    tokens, n = x.shape
    k = a.shape[1]
    if weight.shape != (n, k) or a.shape[0] != tokens:
        raise ValueError(
            f"out weight {tuple(weight.shape)} does not fit a {tuple(a.shape)}, x {tuple(x.shape)}"
        )
    out = torch.empty_like(x)
    block_t, block_k, use_dot = _tiles(tokens, BLOCK_OUT, k)
    _out_residual[(triton.cdiv(n, BLOCK_OUT),)](
        a.contiguous(),
        weight,
        bias,
        x.contiguous(),
        out,
        tokens,
        n,
        k,
        block_t,
        BLOCK_OUT,
        block_k,
        use_dot,
        _precision(weight.dtype),
    )
    return out


def route(
    x: torch.Tensor,
    norm_scale: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, indices, weights): ``t = RMSNorm(x)`` `[T, H]`, each token's `top_k` experts by router logit
    `[T, top_k]` int64 (highest first) and a softmax over those logits `[T, top_k]`, in `x`'s dtype."""
    _check_rows(x)
    tokens, hidden = x.shape
    experts = weight.shape[0]
    if weight.shape[1] != hidden or not 0 < top_k <= experts:
        raise ValueError(f"router {tuple(weight.shape)}, top {top_k}: do not fit x {tuple(x.shape)}")
    t = torch.empty_like(x)
    indices = torch.empty(tokens, top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(tokens, top_k, dtype=x.dtype, device=x.device)
    block_e = triton.next_power_of_2(experts)
    block_k = max(16, min(256, _FMA_TILE // block_e, triton.next_power_of_2(hidden)))
    _route[(tokens,)](
        x.contiguous(),
        norm_scale,
        weight,
        bias,
        t,
        indices,
        weights,
        eps,
        hidden,
        experts,
        top_k,
        block_e,
        triton.next_power_of_2(top_k),
        block_k,
    )
    return t, indices, weights


# -- the seam ------------------------------------------------------------------------------------------------


class TritonFusedLayers:
    """The fused decode layer of :meth:`Kernels.triton <model.kernels.Kernels.triton>`: an attention
    block in two fused launches around the attention (on a decode step its one launch, which stores
    nothing), an MLP block's norm and routing in one before the experts (the Triton decode kernels add the
    residual). A block runs it for steps of up to :data:`MAX_TOKENS` rows on plain weights
    (:meth:`applies`), else its own forward, the spec these are tested against."""

    max_tokens = MAX_TOKENS

    def __init__(self) -> None:
        # Per (device, KV heads): the decode attention's arrival counters (decode_attention's `arrivals`),
        # one per (row, KV head) of the largest step. Each launch leaves them zero; allocated once, so a
        # captured graph's pointer to them stays valid.
        self._arrivals: dict[tuple[torch.device, int], torch.Tensor] = {}

    def applies(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether a step of activations `x` runs fused on `weight` (a prepacked oneDNN weight does not)."""
        return x.shape[0] <= self.max_tokens and not weight.is_mkldnn

    def attention(
        self,
        block: AttentionWeights,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """``block(x, cos_sin, meta, cache)`` without adapters: the residual stream after the attention.

        A decode step over a cache, on the Triton attention, stores its keys and values from the QKV kernel
        (:func:`norm_qkv_rope_store`) and attends in one launch, without a store of its own and with the
        splits' merge in the split launch (this object's arrival counters); any other step (a prompt chunk,
        whose varlen attention stores first; no cache; another attention) goes through the attention seam
        between the two fused kernels."""
        attention = block.attention
        if (
            cache is None
            or max(meta.query_lens) > 1  # host-side lengths: no device sync to decide
            or not isinstance(attention, TritonAttention)
            or not attention.takes(block.heads, block.kv_heads, block.head_dim)
        ):
            return fused_attention(block, x, cos_sin, meta, cache, norm_qkv_rope, out_residual)
        kv = cache.layer(block.layer, block.window, meta)
        norm = block.norm
        q = norm_qkv_rope_store(
            x, norm.scale, norm.eps, block.qkv.weight, block.qkv.bias, *cos_sin, block.heads, block.kv_heads,
            kv.k, kv.v, kv.tables.slot_mapping,
        )  # fmt: skip
        arrivals = self._arrivals.get((x.device, block.kv_heads))
        if arrivals is None:
            arrivals = torch.zeros(self.max_tokens * block.kv_heads, dtype=torch.int32, device=x.device)
            self._arrivals[(x.device, block.kv_heads)] = arrivals
        t = attention.decode(q, meta, kv, block.sinks, block.scale, block.window, arrivals)
        return out_residual(t, block.out.weight, block.out.bias, x)

    def mlp(self, block: MLPWeights, x: torch.Tensor, lora: torch.Tensor | None) -> torch.Tensor:
        """``block(x, lora)``: the norm and routing in one launch (:func:`route`), then the experts. The
        Triton experts add the residual in their last decode kernel
        (:func:`~model.kernels.triton_moe.experts_triton_residual`: not with adapters or dense weights);
        any other experts are followed by the add, as the block's forward runs them."""
        t, indices, weights = route(
            x, block.norm.scale, block.norm.eps, block.gate.weight, block.gate.bias, block.top_k
        )
        if block.experts is experts_triton:
            return experts_triton_residual(block, x, t, indices, weights, lora)
        return x + block.experts(block, t, indices, weights, lora)
