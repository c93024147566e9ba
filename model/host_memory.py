"""CPU memory for the weights a decode step streams: on 2 MB pages, and owned by this process.

Why 2 MB pages: a decode step reads each large weight once, front to back, and with 4 KB pages it crosses a
page every 4 KB (a TLB miss each, and the hardware prefetcher stops at page boundaries). On 2 MB pages the
bfloat16 GEMV read the vocabulary projection 10-15% faster and the MXFP4 kernel an expert about 10%
(benchmarks/README.md). Linux is asked for them with ``madvise(MADV_HUGEPAGE)`` before any page is touched;
where transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage/enabled`` = never) the advice does
nothing and is harmless.

Each such buffer is a private anonymous mapping of its own, so that a tensor can be recognised as already on
huge pages (:func:`on_huge_pages` then keeps it instead of copying it: a copy of the 1.2 GB vocabulary
projection would add its size to the peak RSS of a load) and is unmapped whole when its last view goes.
"""

from __future__ import annotations

import math
import mmap
import weakref

import torch

HUGE_PAGE = 2 << 20  # bytes of an x86-64 transparent huge page
_ADVICE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only

# The mappings handed out by huge_empty, by the address their storage starts at. A mapping lives as long as a
# tensor views it (torch.frombuffer holds it), and leaves this table when it is unmapped.
_MAPPINGS: weakref.WeakValueDictionary[int, mmap.mmap] = weakref.WeakValueDictionary()


def huge_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor, its contents unspecified, that starts on a 2 MB boundary in memory Linux is asked to
    back with 2 MB pages; a plain ``torch.empty`` where it is smaller than one such page or the platform has
    no such advice."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or _ADVICE is None:
        return torch.empty(shape, dtype=dtype)
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # whole pages, and room to start on a boundary
    mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE
    mapping.madvise(_ADVICE, offset, length - offset)
    _MAPPINGS[whole.data_ptr()] = mapping
    return whole[offset : offset + nbytes].view(dtype).view(shape)


def is_on_huge_pages(t: torch.Tensor) -> bool:
    """Whether `t` views memory from :func:`huge_empty`'s huge pages."""
    return t.device.type == "cpu" and not t.is_mkldnn and t.untyped_storage().data_ptr() in _MAPPINGS


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """CPU tensor `t` in memory from :func:`huge_empty`: `t` itself where it is there already, is smaller than
    one huge page or the platform has no such advice, else a copy."""
    if t.device.type != "cpu" or t.nbytes < HUGE_PAGE or _ADVICE is None or is_on_huge_pages(t):
        return t
    return huge_empty(t.shape, t.dtype).copy_(t)
