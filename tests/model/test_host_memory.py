"""CPU memory on huge pages: where it starts, what is copied, and that it is given back."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from model import host_memory
from model.host_memory import HUGE_PAGE, huge_empty, is_on_huge_pages, on_huge_pages

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's"
)


@linux_only
@pytest.mark.parametrize(
    "shape", [(HUGE_PAGE // 2,), (HUGE_PAGE // 2 // 64 + 5, 64), (3, 5, HUGE_PAGE // 20)]
)
def test_a_large_tensor_starts_on_a_huge_page_and_holds_its_values(shape: tuple[int, ...]) -> None:
    t = huge_empty(shape, torch.bfloat16)
    assert t.shape == shape
    assert t.dtype == torch.bfloat16
    assert t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE == 0
    assert is_on_huge_pages(t)
    assert is_on_huge_pages(t[1:])
    values = torch.randn(shape).bfloat16()
    t.copy_(values)
    assert torch.equal(t, values)


def test_a_small_tensor_is_plain_memory() -> None:
    t = huge_empty((16, 64), torch.float32)
    assert t.shape == (16, 64)
    assert not is_on_huge_pages(t)
    assert on_huge_pages(t) is t


@linux_only
def test_on_huge_pages_copies_once() -> None:
    plain = torch.randn(HUGE_PAGE // 4 + 3)
    assert not is_on_huge_pages(plain)
    moved = on_huge_pages(plain)
    assert moved.data_ptr() != plain.data_ptr()
    assert torch.equal(moved, plain)
    assert is_on_huge_pages(moved)
    assert on_huge_pages(moved) is moved
    assert on_huge_pages(torch.nn.Parameter(moved, requires_grad=False)).data_ptr() == moved.data_ptr()


@linux_only
def test_the_mapping_is_given_back_when_its_last_view_goes() -> None:
    t = huge_empty((HUGE_PAGE,), torch.uint8)
    view = t[HUGE_PAGE // 2 :]
    base = t.untyped_storage().data_ptr()
    del t
    gc.collect()
    assert base in host_memory._MAPPINGS  # the view keeps it
    del view
    gc.collect()
    assert base not in host_memory._MAPPINGS
