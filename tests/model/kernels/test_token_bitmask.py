"""The compiled loop that applies grammar masks to host logits against its torch twin and a bit-by-bit
reference, over the shapes a grammar's masks take, and the fallback where it cannot be built."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine.constraint import apply_token_masks
from model.kernels import token_bitmask
from model.kernels.token_bitmask import apply_bitmask, apply_bitmask_torch


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert token_bitmask.available(), "this machine has a compiler: the mask loop must build"


def bit_by_bit(logits: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
    out = logits.clone()
    for row in range(out.shape[0]):
        for token in range(out.shape[1]):
            if not (int(masks[row, token // 32]) >> (token % 32)) & 1:
                out[row, token] = float("-inf")
    return out


def grammar_like_masks(rows: int, words: int, seed: int) -> np.ndarray:
    """Rows as a grammar writes them: free text (all ones), a JSON string (scattered zero bits), JSON structure
    (all zeros but a few bits), random words, a closed row, and one word of every kind in a row."""
    rng = np.random.default_rng(seed)
    kinds = []
    for r in range(rows):
        kind = r % 6
        if kind == 0:
            row = np.full(words, -1, dtype=np.int64)
        elif kind == 1:
            row = np.full(words, -1, dtype=np.int64)
            for _ in range(max(1, words // 3)):
                row[rng.integers(words)] &= ~(1 << int(rng.integers(32)))
        elif kind == 2:
            row = np.zeros(words, dtype=np.int64)
            for _ in range(3):
                row[rng.integers(words)] |= 1 << int(rng.integers(32))
        elif kind == 3:
            row = rng.integers(0, 2**32, size=words)
        elif kind == 4:
            row = np.zeros(words, dtype=np.int64)
        else:
            row = rng.choice([0, 2**32 - 1, 2**31, 1, 0x7FFFFFFE], size=words)
        kinds.append(row)
    return np.stack(kinds).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "vocab", "words"), [(6, 96, 3), (12, 100, 4), (7, 33, 2), (6, 31, 1)])
def test_the_loop_equals_its_twins(rows: int, vocab: int, words: int, dtype: torch.dtype) -> None:
    """Vocabularies a whole number of words, with a partial last word, and masks naming tokens past the
    model's rows (a mask word more than the vocabulary needs): those bits are ignored."""
    masks = grammar_like_masks(rows, words, seed=vocab)
    source = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)).to(dtype)
    expected = bit_by_bit(source, masks)
    looped, unpacked = source.clone(), source.clone()
    apply_bitmask(looped, torch.from_numpy(masks))
    apply_bitmask_torch(unpacked, torch.from_numpy(masks))
    assert torch.equal(looped, expected)
    assert torch.equal(unpacked, expected)


def test_the_loop_equals_its_twin_on_the_harmony_vocabulary() -> None:
    vocab, words = 201_088, 6284
    masks = torch.from_numpy(grammar_like_masks(12, words, seed=1))
    source = torch.randn(12, vocab, generator=torch.Generator().manual_seed(2))
    looped, unpacked = source.clone(), source.clone()
    apply_bitmask(looped, masks)
    apply_bitmask_torch(unpacked, masks)
    assert torch.equal(looped, unpacked)
    assert torch.isinf(looped[4]).all()  # a closed row
    assert torch.equal(looped[0], source[0])  # an open one


def test_masks_that_do_not_cover_the_logits_are_refused() -> None:
    logits = torch.zeros(2, 70)
    for masks in (torch.full((2, 2), -1, dtype=torch.int32), torch.full((3, 3), -1, dtype=torch.int32)):
        with pytest.raises(RuntimeError, match="mask"):
            apply_bitmask(logits, masks)
        with pytest.raises(ValueError, match="do not cover"):
            apply_bitmask_torch(logits, masks)
    with pytest.raises(RuntimeError, match="int32"):
        apply_bitmask(logits, torch.full((2, 3), -1, dtype=torch.int64))


@pytest.mark.parametrize("cause", ["no compiler", "build fails"])
def test_without_the_loop_host_logits_take_the_torch_twin(
    cause: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(token_bitmask, "_module", None)
    monkeypatch.setattr(token_bitmask, "_failed", False)
    if cause == "no compiler":
        monkeypatch.setattr(token_bitmask.shutil, "which", lambda tool: None)
    else:

        def broken() -> object:
            raise RuntimeError("Error building extension\nc++: fatal error: killed")

        monkeypatch.setattr(token_bitmask, "_build", broken)
    masks = grammar_like_masks(6, 4, seed=3)
    source = torch.randn(6, 100)
    logits = source.clone()
    with caplog.at_level(logging.WARNING, logger=token_bitmask.__name__):
        apply_token_masks(logits, torch.from_numpy(masks))
    assert "applied with torch ops" in caplog.text
    assert ("no c++ or ninja found" if cause == "no compiler" else "c++: fatal error: killed") in caplog.text
    assert torch.equal(logits, bit_by_bit(source, masks))
    assert not token_bitmask.available()  # decided once per process
    with pytest.raises(RuntimeError, match="not built"):
        apply_bitmask(logits, torch.from_numpy(masks))
