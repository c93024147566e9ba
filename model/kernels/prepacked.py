"""Prepacked linear: a CPU fast path for bfloat16 matmuls whose weight is used again every step.

On the CPU, ``F.linear`` with a plain row-major bf16 weight runs oneDNN's AMX matmul on that layout
(``ONEDNN_VERBOSE`` shows ``wei:bf16::blocked:ba``), which repacks the weight into the blocked VNNI layout the
AMX tiles need as part of every call. Reordered once, at load time, into the layout the kernel wants
(``AB16b32a2b``), the weight is read straight from memory, which matters most where decode is bound by
reading weights that do not fit in the cache.

:func:`prepack` does that reorder. Its result is an opaque oneDNN tensor with the weight's shape and byte size
that *replaces* the plain weight, so no second copy is kept. :func:`linear` runs a weight of either kind;
:func:`linear_reference` is its plain twin, ``F.linear`` on the plain weight that :func:`plain` recovers,
compared with it in tests.

The fast path applies only where :func:`applies` says so: a 2-D bfloat16 weight on the CPU, with oneDNN built
in, enabled and able to do bf16 on this CPU. Every other weight (CUDA, float32) is returned unchanged by
:func:`prepack` and runs ``F.linear``. float32 is left out on purpose: a prepacked float32 weight is slower
at 1-2 rows per matmul, the usual per-expert row count at decode.

A plain bf16 weight multiplied by a few rows (:func:`model.kernels.cpu_mxfp4.gemv_applies`) takes the
hand-written GEMV :func:`model.kernels.cpu_mxfp4.bf16_gemv` instead of ``F.linear``, which is faster than
oneDNN on that plain weight at every row count up to its limit, and at one or two rows faster than oneDNN on
the prepacked weight too: it streams the weight at about the memory's speed. So where it is built,
:func:`for_decode` keeps the model's linears plain (the attention projections, the router, the vocabulary
projection: read whole by every decode step, by one or two rows at batch 1), on huge pages
(:func:`model.host_memory.on_huge_pages`); a prefill's many rows then run oneDNN on the plain weight, about
10% slower on those matmuls than on a prepacked one, and a batched decode of 4-16 rows pays up to 1.45x on
them against the prepacked weight (benchmarks/README.md): the trade favours the single user's decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.host_memory import on_huge_pages
from model.kernels import cpu_mxfp4


def applies(weight: torch.Tensor) -> bool:
    """Whether :func:`prepack` reorders `weight` (rather than returning it as it is)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not weight.is_mkldnn
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """`weight [out, in]` in oneDNN's blocked layout where the fast path :func:`applies`, else `weight`."""
    if not applies(weight):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def for_decode(weight: torch.Tensor) -> torch.Tensor:
    """`weight [out, in]` as the model keeps a linear's weight: plain on huge pages where the bf16 GEMV takes
    it at decode (:func:`model.kernels.cpu_mxfp4.gemv_applies`), else :func:`prepack`'s."""
    if applies(weight) and cpu_mxfp4.native_bf16():
        return on_huge_pages(weight.contiguous())
    return prepack(weight)


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """`weight [out, in]` with the same values stored transposed (``weight.t()`` contiguous), for a float32
    matrix with a very long output side on the CPU: the vocabulary projection. ``F.linear`` and :func:`linear`
    run it unchanged. A trade (``benchmarks/unembedding_bench.py``; figures in benchmarks/README.md): much
    faster for one row, a little for many, slower around 16. Taken for the single-request step (first token
    of a cached prefix, every decode of a lone request); every float32 linear and expert stored this way was
    no better at decode, so only the projection is."""
    return weight.t().contiguous().t()


def plain(weight: torch.Tensor) -> torch.Tensor:
    """The plain `[out, in]` weight of a prepacked one (a new tensor), or `weight` itself if it is plain."""
    return weight.to_dense() if weight.is_mkldnn else weight


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a plain or a prepacked `weight`.

    With `out` (a contiguous ``[rows, out_features]`` tensor, of `x`'s dtype or wider) the result is written
    there and `out` returned: straight from the matmul for a plain weight of `out`'s dtype, through a copy
    otherwise (a prepacked weight, or bf16 into float32). A plain bf16 weight and few bf16 rows take
    :func:`model.kernels.cpu_mxfp4.bf16_gemv`, its float32 sums rounded to bf16 (into a float32 `out` too, so
    that the values do not depend on whether `out` is given), written straight into a contiguous `out`."""
    if cpu_mxfp4.gemv_applies(x, weight):
        if out is not None and out.is_contiguous() and out.dtype in (torch.float32, torch.bfloat16):
            return cpu_mxfp4.bf16_gemv(x, weight, bias, out, round_bf16=True)
        product = cpu_mxfp4.bf16_gemv(x, weight, bias, x.new_empty(x.shape[0], weight.shape[0]))
        return product if out is None else out.copy_(product)
    if out is None:
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)
    if weight.is_mkldnn or weight.dtype != out.dtype:
        return out.copy_(linear(x, weight, bias))
    if bias is None:
        return torch.matmul(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain twin of :func:`linear`: ``F.linear`` on the plain weight."""
    return F.linear(x, plain(weight), bias)
