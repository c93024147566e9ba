"""Grammar masks applied to logits: every token a packed bitmask forbids set to -inf, in place.

A mask row packs one bit per token in int32 words, llguidance's layout (bit i of word j allows token
32·j + i); it may name a few tokens past the model's rows, which are ignored. Two implementations:

* :func:`apply_bitmask`, logits in host memory: a compiled loop (``token_bitmask.cpp`` beside this file) that
  writes only the forbidden logits, word by word, and releases the GIL while it runs. On a CPU a step's 64
  rows of a JSON string's masks cost it a few milliseconds, where torch ops unpacking every bit and a masked
  fill over every logit cost tens (their per-element branch mispredicts on scattered bits), and numpy
  turning the words into index lists would hold the GIL against the forward's Python parts.
* :func:`apply_bitmask_torch`, logits on any device: each word shifted by 0..31 into a boolean mask, then one
  masked fill. The GPU route (the packed words are a small copy; the unpacking happens on the device, with
  no sync), the host's fallback where the loop is not built, and the loop's twin in tests.

The loop is built at first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja at
run time, cached under torch's extensions directory, as :mod:`model.kernels.cpu_mxfp4`); it is compiled for
the architecture's baseline (no ``-march=native``: the loop is bound by memory, not by instructions), and the
build's name still carries the digest of the compiler's target, so a cache shared with another architecture
never loads a foreign build. Where it cannot be built, :func:`available` warns once and callers take
:func:`apply_bitmask_torch`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import torch

from model.kernels import cpp_build

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("token_bitmask.cpp")
FLAGS = ("-O3", "-fopenmp")

_lock = threading.Lock()
_module: object | None = None
_failed = False


def _build() -> object:
    from torch.utils.cpp_extension import load_inline

    source = _SOURCE.read_text()
    return load_inline(
        name=cpp_build.build_name("gpt_oss_token_bitmask", source, FLAGS),
        cpp_sources=[source],
        functions=["apply_bitmask"],
        extra_cflags=list(FLAGS),
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def available() -> bool:
    """Whether the host loop is built (building it on the first call, once per process: about a second when
    torch's extension cache has it, up to a minute otherwise). False, with a warning naming the cause, where
    no C++ compiler or ninja is found or the build fails."""
    global _module, _failed
    with _lock:
        if _module is not None or _failed:
            return _module is not None
        missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
        if missing:
            _failed = True
            logger.warning(
                "no %s found: grammar masks on host logits are applied with torch ops (tens of milliseconds "
                "a step at a batch of 64); install a C++ compiler and ninja for the compiled loop",
                " or ".join(missing),
            )
            return False
        try:
            logger.info("building the grammar mask loop (cached after the first build)")
            _module = _build()
        except Exception as error:  # a compiler that fails for any reason leaves the slower, working path
            _failed = True
            logger.warning(
                "the grammar mask loop did not build (%s): grammar masks on host logits are applied with "
                "torch ops",
                str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
            )
            return False
        return True


def apply_bitmask(logits: torch.Tensor, masks: torch.Tensor) -> None:
    """Set to -inf, in place, every logit of `logits` (contiguous [batch, vocab], a float dtype, on the host)
    whose bit in `masks` (contiguous int32 [batch, words], words·32 >= vocab, on the host) is clear. Requires
    :func:`available`."""
    if _module is None:
        raise RuntimeError("the grammar mask loop is not built: call available() first")
    _module.apply_bitmask(logits, masks)  # type: ignore[attr-defined]


def apply_bitmask_torch(logits: torch.Tensor, masks: torch.Tensor) -> None:
    """:func:`apply_bitmask` in torch ops, for `logits` and `masks` on one device (any)."""
    batch, vocab = logits.shape
    if masks.shape[0] != batch or masks.shape[1] * 32 < vocab:
        raise ValueError(f"masks {tuple(masks.shape)} do not cover logits {tuple(logits.shape)}")
    # The shifts are made where the masks are: a copy from host memory would wait for the device.
    shifts = torch.arange(32, dtype=torch.int32, device=masks.device)
    bits = (masks[:, :, None] >> shifts) & 1  # [batch, words, 32]
    logits.masked_fill_(bits.flatten(1)[:, :vocab] == 0, float("-inf"))
