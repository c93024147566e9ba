"""Constrained decoding: a request's grammar, as the mask of the tokens it allows next.

A :class:`GrammarConstraint` wraps one request's llguidance matcher. Before a step samples, each constrained
row fills its row of an int32 bitmask (bit i of word j allows token 32·j + i, llguidance's layout) and
:func:`apply_token_masks` sets every disallowed logit to -inf in one batched operation on the logits' device;
after the step the sampled token advances the matcher. The engine knows nothing of what the grammar says
(harmony, JSON): it only fills and applies masks.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class Grammar:
    """A constraint on a request's whole output: llguidance grammar text, and the tokenizer it is read with
    (llguidance's view of the vocabulary: large, built once per process and shared)."""

    text: str
    tokenizer: Any


@functools.lru_cache(maxsize=256)
def _compiled(grammar: Grammar) -> tuple[llguidance.LLMatcher | None, str | None]:
    """The grammar compiled into a matcher in its initial state, or why it does not compile (llguidance's
    message). Remembered per grammar: a request is checked where it is prepared, again at admission on the
    engine thread, and each of its choices starts from a copy of this matcher, so one compile serves all."""
    matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.text, log_level=0)
    if matcher.is_error():
        return None, matcher.get_error() or "the grammar does not compile"
    return matcher, None


def grammar_problem(grammar: Grammar) -> str | None:
    """Why `grammar` does not compile, or None."""
    return _compiled(grammar)[1]


def compile_within(grammar: Grammar, seconds: float) -> str | None:
    """Why `grammar` cannot be used: it does not compile, or compiling it takes longer than `seconds`. The
    compile runs on a thread of its own (llguidance drops the GIL while it compiles) so that the caller waits
    at most `seconds`; a compile that runs on is bounded by llguidance's own limits, holds only its thread,
    and its result is remembered when it ends."""
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(grammar_problem(grammar)), daemon=True)
    thread.start()
    thread.join(seconds)
    if not result:
        return f"compiling the grammar took longer than {seconds:g} s"
    return result[0]


class GrammarConstraint:
    """One request's grammar state. Masks cover the tokenizer's vocabulary, which may name a token or two past
    the model's rows (they are trimmed when applied)."""

    def __init__(self, grammar: Grammar) -> None:
        template, problem = _compiled(grammar)
        if template is None:
            raise ValueError(problem)
        self.matcher = template.deep_copy()
        self.words = (grammar.tokenizer.vocab_size + 31) // 32

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` (int32 [words], C-contiguous)."""
        if row.dtype != np.int32 or not row.flags.c_contiguous or row.shape != (self.words,):
            raise ValueError(f"a mask row is a contiguous int32 array of {self.words} words")
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def advance(self, token: int) -> None:
        """Take the sampled token; a token the mask did not allow leaves the matcher in error."""
        self.matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()


_BITS = torch.arange(32, dtype=torch.int32)


def apply_token_masks(logits: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> None:
    """Set to -inf, in place, the logits of `rows` (distinct, increasing) whose tokens their masks (int32
    [len(rows), words], on the host) do not allow; the other rows are untouched. One unpack and one masked
    fill for the whole batch: on the host numpy's `unpackbits` (a byte table, several times faster than
    shifting every word 32 times), elsewhere the shifts, on the logits' device. When every row is
    constrained the fill is in place, with no gather and scatter of the rows."""
    vocab = logits.shape[1]
    if logits.device.type == "cpu":
        forbidden = forbidden_by_table(masks, vocab)
    else:
        forbidden = forbidden_by_shifts(masks, vocab, logits.device)
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))


def forbidden_by_table(masks: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [n, vocab]: the tokens the host masks forbid, unpacked byte by byte (little-endian words)."""
    unpacked = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    return torch.from_numpy(unpacked) == 0


def forbidden_by_shifts(masks: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """bool [n, vocab] on `device`: the tokens the masks forbid, each word shifted by 0..31 there."""
    bits = (masks.to(device)[:, :, None] >> _BITS.to(device)) & 1  # [n, words, 32]
    return bits.flatten(1)[:, :vocab] == 0


def apply_token_masks_reference(logits: torch.Tensor, rows: list[int], masks: np.ndarray) -> None:
    """Plain twin of :func:`apply_token_masks`: token by token, bit by bit."""
    for r, row in enumerate(rows):
        for token in range(logits.shape[1]):
            word, bit = divmod(token, 32)
            if not (int(masks[r, word]) >> bit) & 1:
                logits[row, token] = float("-inf")
