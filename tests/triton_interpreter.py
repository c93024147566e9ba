"""A test-only fix of Triton 3.6's interpreter, which the kernel tests run under without a GPU.

The interpreter's ``tl.dot`` multiplies the uint16 storage of bfloat16 operands as integers (only fp8 ones
are converted first), so a kernel's bf16 dot returns garbage there while the GPU computes it right.
:func:`bf16_dots_widened` widens bf16 operands to float32 first (exact) for as long as it is active, so
the kernels keep the code the GPU runs. Harmless where no interpreter runs (it patches only the
interpreter's builder)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import triton.language as tl
from triton.runtime import interpreter


def _widen(handle: Any) -> Any:
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    # Exact: a bfloat16 is the top half of the float32 of the same value.
    wide = (handle.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return interpreter.TensorHandle(wide, tl.float32)


@contextmanager
def bf16_dots_widened() -> Iterator[None]:
    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def create_dot(self: Any, a: Any, b: Any, d: Any, *args: Any) -> Any:
        return original(self, _widen(a), _widen(b), d, *args)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = original
