"""The CPU MoE on packed MXFP4 experts: a fused dequantize-and-multiply kernel, compiled at first use.

:func:`model.kernels.experts.experts_grouped` dequantizes each active expert's whole matrix to the model's
dtype and then multiplies; at decode (one token per expert) that conversion costs far more than the product,
and writes and reads again a matrix four times the size of the packed bytes. :func:`mxfp4_linear` instead
reads each weight's packed bytes once, decoding a nibble by a lookup in a 16-entry table held in one register
and scaling each block of 32 by its power of two once (so each weight equals the dequantized one exactly),
threaded over output rows. Two paths, by the inputs' dtype:

* bfloat16 inputs, where the CPU has AVX512-BF16: one permute decodes a block's 32 codes straight to
  bfloat16 through a table already scaled by the block's power of two, and VDPBF16PS multiplies 32 weights by
  32 inputs into 16 float32 sums. A single token (batch-1 decode) takes the weight rows one after another,
  each read front to back, which one thread streams far faster than rows read side by side; otherwise four
  weight rows are multiplied together against each input load. A decode step's few tokens use the weights
  straight from registers; more tokens (prefill) decode four rows once into a small buffer that stays in L1
  and run tiles of six tokens over it, so the decode is shared by every token. A bfloat16 model lays its
  experts out at load in row pairs (:func:`model.kernels.mxfp4.pair_rows`, `paired` here): two rows' bytes
  side by side in memory, so that a decode step reads them as one stream and loads each input once for
  both, and interleaved so that one multiply by the scales serves 16 blocks (``cpu_mxfp4.cpp`` says how).
  Up to four tokens are multiplied on the pairs as they lie; more put a group of rows back in order first.
  VDPBF16PS flushes subnormal products to zero (as oneDNN's bfloat16 matmuls do), so a row with a scale so
  small or large that its products could leave float32's normal range takes a plain float32 loop.
* float32 inputs (or no AVX512-BF16, bfloat16 converted first): 16 codes per permute (AVX-512), or 8 with
  the sign bit put in by an xor (AVX2), FMAs into float32 sums for a tile of up to :data:`TILE` tokens per
  decoded block; the inputs laid out once per call so a block's even elements (low nibbles) and odd ones
  (high nibbles) are contiguous. Without either instruction set it compiles a scalar loop.

The source is ``cpu_mxfp4.cpp`` beside this file; which of these it compiles is decided by the compiler's
``-march=native``, so the build's name carries a digest of the targeted features and of the source
(:func:`model.kernels.cpp_build.build_name`).

Why a C++ extension (``torch.utils.cpp_extension.load_inline``): the decode has to stay in registers, a table
permute per 16 codes feeding the FMAs, and torch ops cannot express that without writing the decoded values
out (which is what the dequantize path does); ``torch.compile`` would need the same compiler at run time
without that control. Measured against the dequantize path on a 20b-shaped layer
(``benchmarks/cpu_bench.py``, figures in benchmarks/README.md). It needs a C++ compiler and ninja at run time
(built once, cached under torch's extensions directory); where either is missing or the build fails,
:func:`available` logs a warning and the model keeps the dequantize path.

The same build carries :func:`bf16_gemv`, a product of a few bfloat16 rows with a plain bfloat16 matrix
(the decode case, bound by reading the weight), which :func:`model.kernels.prepacked.linear` takes for a
plain weight; :func:`bf16_gemv_reference` is its twin. It also compiles ``cpu_decode.cpp``, the rest of a
bfloat16 decode layer that :mod:`model.kernels.cpu_fused` wraps, and :func:`experts_one_token`, a batch-1
step's experts whole.

:func:`mxfp4_linear_reference` is the plain twin: :func:`model.kernels.mxfp4.dequantize_reference` then
``F.linear`` in float32, compared with it in tests.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from model.kernels import cpp_build
from model.kernels.mxfp4 import BLOCK_SIZE, BYTES_PER_BLOCK, FP4_VALUES, SCALE_BIAS, dequantize_reference

logger = logging.getLogger(__name__)

TILE = 8  # tokens sharing one decode of a weight block (8 float32 accumulators of 16 lanes stay in registers)

_SOURCE = Path(__file__).with_name("cpu_mxfp4.cpp")
# The rest of a decode layer (model.kernels.cpu_fused), compiled after _SOURCE in the same extension: it calls
# the GEMV and the experts' rows defined there.
_DECODE_SOURCE = Path(__file__).with_name("cpu_decode.cpp")

_lock = threading.Lock()
_module: object | None = None
_failed = False
_native_bf16 = False  # the build multiplies bfloat16 inputs as they are (AVX512-BF16)


def _source() -> str:
    kernels = (
        _SOURCE.read_text()
        .replace("FP4_VALUES", ", ".join(f"{v!r}f" for v in FP4_VALUES))
        .replace("SCALE_BIAS", str(SCALE_BIAS))
        .replace("TILE_MAX", str(TILE))
    )
    return kernels + "\n" + _DECODE_SOURCE.read_text()


# -ffp-contract=off: a product and a sum written apart stay apart (no fused multiply-add where the source has
# none), so the scalar float32 steps round as the torch operators they stand in for do.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off")


def _build() -> object:
    from torch.utils.cpp_extension import load_inline

    source = _source()
    return load_inline(
        name=cpp_build.build_name("gpt_oss_cpu_mxfp4", source, FLAGS),
        cpp_sources=[source],
        functions=[
            "mxfp4_linear",
            "mxfp4_experts_one",
            "native_bf16",
            "bf16_gemv",
            "norm_qkv_rope",
            "paged_attention",
            "out_residual",
            "norm_route",
            "experts_one_token",
        ],
        extra_cflags=list(FLAGS),
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def available() -> bool:
    """Whether the fused kernel is built (building it on the first call, once per process: a second when
    torch's extension cache has it, about a minute otherwise). False, with a warning naming the cause, where
    no C++ compiler or ninja is found or the build fails; callers then keep the dequantize path."""
    global _module, _failed, _native_bf16
    with _lock:
        if _module is not None or _failed:
            return _module is not None
        missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
        if missing:
            _failed = True
            logger.warning(
                "no %s found: the CPU experts fall back to dequantizing each active expert per step (several "
                "times slower at decode); install a C++ compiler and ninja (Debian/Ubuntu: apt install g++ "
                "ninja-build) for the fused MXFP4 kernel",
                " or ".join(missing),
            )
            return False
        try:
            logger.info("building the fused CPU MXFP4 kernel (cached after the first build)")
            _module = _build()
            _native_bf16 = bool(_module.native_bf16())  # type: ignore[attr-defined]
        except Exception as error:  # a compiler that fails for any reason leaves the slower, working path
            _failed = True
            logger.warning(
                "the fused CPU MXFP4 kernel did not build (%s): the CPU experts fall back to dequantizing "
                "each active expert per step",
                str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
            )
            return False
        return True


def module() -> object:
    """The built extension, for the modules that wrap its other functions (:mod:`model.kernels.cpu_fused`).
    Requires :func:`available`."""
    if _module is None:
        raise RuntimeError("the CPU kernels are not built: call available() first")
    return _module


def native_bf16() -> bool:
    """Whether the built kernel multiplies bfloat16 inputs as they are (the CPU has AVX512-BF16); False where
    it converts them to float32 first, or is not built."""
    return available() and _native_bf16


def mxfp4_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    paired: bool = False,
) -> torch.Tensor:
    """``x @ W.T + bias`` for `x [M, K]` on the CPU and `W [N, K]` given as MXFP4 `blocks [N, K/32, 16]` and
    `scales [N, K/32]`, accumulated in float32 and returned in `x`'s dtype. `paired`: the blocks are in
    :func:`model.kernels.mxfp4.pair_rows`' layout (bfloat16 `x` and :func:`native_bf16` only). Requires
    :func:`available`."""
    if _module is None:
        raise RuntimeError("the fused CPU MXFP4 kernel is not built: call available() first")
    if blocks.shape[-1] != BYTES_PER_BLOCK or x.shape[-1] != blocks.shape[-2] * BLOCK_SIZE:
        raise ValueError(f"x {tuple(x.shape)} does not match MXFP4 blocks {tuple(blocks.shape)}")
    empty = x.new_empty(0, dtype=torch.float32)
    b = empty if bias is None else bias.float().contiguous()
    native = x.dtype == torch.bfloat16 and _native_bf16
    if paired and not native:
        raise ValueError("row-paired MXFP4 blocks take bfloat16 inputs on a CPU with AVX512-BF16 only")
    inputs = (x if native else x.float()).contiguous()
    out = _module.mxfp4_linear(  # type: ignore[attr-defined]
        inputs, blocks.contiguous(), scales.contiguous(), b, paired
    )
    return out.to(x.dtype)


def mxfp4_experts_one(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    experts: torch.Tensor,
    *,
    paired: bool = False,
) -> torch.Tensor:
    """One token through several experts at once: row p of the result is ``x[p] @ W[experts[p]].T + bias[p]``
    (``x[0]`` for every p where `x` has one row), `W` a layer's stacked experts as MXFP4 `blocks [E, N, K/32,
    16]` and `scales [E, N, K/32]`, `bias [P, N]` each pair's bias row. Equal, row for row, to
    :func:`mxfp4_linear` of each expert alone (`paired` as there), in one parallel loop instead of one per
    expert. bfloat16 `x` only; requires :func:`native_bf16`."""
    if not native_bf16():
        raise RuntimeError("mxfp4_experts_one needs the kernel built with AVX512-BF16 (native_bf16())")
    b = x.new_empty(0, dtype=torch.float32) if bias is None else bias.float().contiguous()
    out = _module.mxfp4_experts_one(  # type: ignore[attr-defined]
        x.contiguous(), blocks.contiguous(), scales.contiguous(), b, experts.contiguous(), paired
    )
    return out.to(x.dtype)


def experts_one_token(
    t: torch.Tensor,
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    indices: torch.Tensor,
    weights: torch.Tensor,
    alpha: float,
    limit: float,
    *,
    up_paired: bool = False,
    down_paired: bool = False,
) -> torch.Tensor:
    """One token `t [1, H]` through its experts `indices [1, k]` weighted by `weights [1, k]`, in one call:
    ``sum_j weights[j] · mlp2(swiglu(mlp1(t)))`` of expert ``indices[j]``, bfloat16 `[1, H]`. `up` and `down`
    are a layer's stacked MXFP4 experts and their biases, ``(blocks, scales, bias [E, N])``, each's blocks
    in :func:`model.kernels.mxfp4.pair_rows`' layout with `up_paired` or `down_paired`. Bit for bit
    :func:`mxfp4_experts_one` per matrix with the SwiGLU, weighting and sum of
    :func:`model.kernels.experts.experts_grouped` around them: the experts in ascending order, each step
    rounded to bfloat16 where those round. Requires :func:`native_bf16`."""
    if not native_bf16():
        raise RuntimeError("experts_one_token needs the kernel built with AVX512-BF16 (native_bf16())")
    return _module.experts_one_token(  # type: ignore[attr-defined]
        t.contiguous(),
        *up,
        *down,
        indices.contiguous(),
        weights.contiguous(),
        alpha,
        limit,
        up_paired,
        down_paired,
    )


# Input rows up to which :func:`bf16_gemv` is taken on a plain weight: up to here it was faster than oneDNN on
# the same plain weight, on the vocabulary projection and the attention projections (benchmarks/README.md).
GEMV_MAX_ROWS = 16


def gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`bf16_gemv` runs ``x @ weight.T``: a plain 2-D bfloat16 `weight` and at most
    :data:`GEMV_MAX_ROWS` rows of bfloat16 `x` on the CPU, with the kernel built for AVX512-BF16."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.dim() == 2
        and weight.dim() == 2
        and not weight.is_mkldnn
        and x.shape[0] <= GEMV_MAX_ROWS
        and native_bf16()
    )


def bf16_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    round_bf16: bool = False,
) -> torch.Tensor:
    """``x @ weight.T + bias`` for bfloat16 `x [M, K]` and a plain bfloat16 `weight [N, K]` (`bias [N]`
    float32 or bfloat16) on the CPU: the decode case, where the product is bound by reading the weight.
    Sixteen weight rows at a time share each input load (VDPBF16PS, float32 sums) and run every input row
    while they are in the cache, so the weight is read from memory once per call.

    Written into `out` (contiguous ``[M, N]``, float32 or bfloat16) when given, else into a new float32
    tensor; rounded to bfloat16 where `out` is bfloat16, or with `round_bf16` (float32 holding bfloat16
    values: what a bfloat16 matmul copied into float32 gives). Requires :func:`native_bf16`."""
    if _module is None or not _native_bf16:
        raise RuntimeError("the bfloat16 GEMV is not built for this CPU: check native_bf16() first")
    if out is None:
        out = x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    _module.bf16_gemv(x.contiguous(), weight.contiguous(), bias, out, round_bf16)  # type: ignore[attr-defined]
    return out


def bf16_gemv_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain twin of :func:`bf16_gemv`: ``F.linear`` in float32 on the same bfloat16 values."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def mxfp4_linear_reference(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain twin of :func:`mxfp4_linear`: the reference dequantization, then ``F.linear`` in float32."""
    weight = dequantize_reference(blocks, scales, torch.float32)
    return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)
