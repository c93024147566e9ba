"""Constrained decoding: a request's grammar, as the mask of the tokens it allows next.

A :class:`GrammarConstraint` wraps one request's llguidance matcher. A step's masks are computed while the
model computes the step: :meth:`TokenMasker.start` hands the constrained rows' matchers (advanced with the
previous step's tokens) to a worker thread, which fills one int32 bitmask for all of them (bit i of word j
allows token 32·j + i, llguidance's layout) in Rust without the GIL. After the forward,
:meth:`StepMasks.apply` waits for that and sets every forbidden logit to -inf on the logits' device (on the
host a compiled loop over the packed words, on a device torch ops over the words copied there), outside the
model (so a captured decode graph never sees a mask); after sampling the token advances the matcher.
The engine knows nothing of what the grammar says (harmony, JSON): it only fills and applies masks.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from model.kernels import token_bitmask

logger = logging.getLogger(__name__)


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


def apply_token_masks(logits: torch.Tensor, masks: torch.Tensor) -> None:
    """Set to -inf, in place, every logit of `logits` ([batch, vocab]) that its row's mask forbids: `masks`
    holds one row per logits row (int32 [batch, words], on the host; all ones for a row without a grammar).
    On the host the compiled loop writes only the forbidden logits, without the GIL
    (:func:`model.kernels.token_bitmask.apply_bitmask`; torch ops where it is not built); on a device the
    packed words are copied there (without waiting when they are pinned) and unpacked there."""
    if logits.device.type == "cpu" and logits.is_contiguous() and token_bitmask.available():
        token_bitmask.apply_bitmask(logits, masks)
    else:
        token_bitmask.apply_bitmask_torch(logits, masks.to(logits.device, non_blocking=True))


def apply_token_masks_reference(logits: torch.Tensor, masks: np.ndarray) -> None:
    """Plain twin of :func:`apply_token_masks`: token by token, bit by bit."""
    for row in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            word, bit = divmod(token, 32)
            if not (int(masks[row, word]) >> bit) & 1:
                logits[row, token] = float("-inf")


def fill_one_by_one(constraints: list[GrammarConstraint], rows: list[np.ndarray]) -> list[str | None]:
    """The worker's fallback when the batched fill raises: one matcher at a time into its mask row (`rows[i]`
    for `constraints[i]`), so that one matcher's failure fails its own row only; per row, why its constraint
    failed, or None."""
    errors: list[str | None] = []
    for constraint, row in zip(constraints, rows, strict=True):
        try:
            constraint.fill(row)
            errors.append(constraint.error)
        except Exception as error:  # the request's own grammar: it fails alone
            errors.append(f"{type(error).__name__}: {error}")
    return errors


@dataclass(slots=True)
class _Filled:
    """What the worker hands back for one step: per constrained row its error (None when its mask holds),
    and the masks of every logits row (int32 [batch, words]; pinned for a copy to a device)."""

    errors: list[str | None]
    masks: torch.Tensor
    seconds: float


@dataclass(slots=True)
class StepMasks:
    """One step's masks in the making: `rows` are the logits rows that have a grammar."""

    rows: list[int]
    future: Future[_Filled]
    masker: TokenMasker
    # Seconds the worker spent filling, and the engine thread waiting for it and applying.
    worker_seconds: float = 0.0
    exposed_seconds: float = 0.0

    def apply(self, logits: torch.Tensor, errors: list[str | None]) -> None:
        """Wait for the masks and set every logit a row's grammar forbids to -inf, in place; a row whose
        grammar failed gets its error in `errors` (its row index) and is left for the caller to drop."""
        start = time.perf_counter()
        filled = self.future.result()
        for row, error in zip(self.rows, filled.errors, strict=True):
            if error is not None and errors[row] is None:
                errors[row] = f"the output constraint failed: {error}"
        apply_token_masks(logits, filled.masks)
        if self.masker.copied is not None:  # the worker's next fill waits for this copy of the buffer
            self.masker.copied.record()
        self.worker_seconds = filled.seconds
        self.exposed_seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Let the worker finish (the step failed before applying): nothing may fill the same buffer under
        it, and its matchers are the engine thread's again once this returns."""
        self.future.exception()


class TokenMasker:
    """Computes a step's masks on a worker thread of its own while the model runs. The engine thread hands
    over the matchers in :meth:`start` and takes them back in :meth:`StepMasks.apply` (or ``wait``): in
    between nothing else touches them (the scheduler advances them only after the step's sampling), and one
    step's masks are in the making at a time, so the buffer needs no lock.

    The worker only fills the packed words, in llguidance's Rust without the GIL; everything after (a loop
    over the words on the host, a copy and torch ops on a device) runs on the engine thread once the forward
    is done. Work in Python or numpy on the worker would hold the GIL while the forward's Python parts wait
    for it, so it would cost the step more than it takes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-masks")
        self._executor: llguidance.LLExecutor | None = None
        self._buffer = torch.empty((0, 0), dtype=torch.int32)
        # Recorded after each copy of the buffer to the device: the next fill waits for it.
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        if device.type == "cpu":
            token_bitmask.available()  # built (or its absence reported) now, not at the first grammar

    def start(self, constraints: list[GrammarConstraint | None]) -> StepMasks | None:
        """Begin the masks of a step whose logits row i samples for `constraints[i]` (None: no grammar);
        None when no row has one."""
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return None
        return StepMasks(rows, self._pool.submit(self._fill, constraints, rows), self)

    def _buffer_for(self, rows: int, words: int) -> torch.Tensor:
        """The first `rows` rows of the masks' buffer (grown on demand, pinned when they go to a device)."""
        if self._buffer.shape[0] < rows or self._buffer.shape[1] != words:
            self._buffer = torch.empty(
                (max(rows, self._buffer.shape[0]), words),
                dtype=torch.int32,
                pin_memory=self.device.type == "cuda",
            )
        return self._buffer[:rows]

    def _fill(self, constraints: list[GrammarConstraint | None], rows: list[int]) -> _Filled:
        """On the worker: every constrained row's mask into one buffer, in parallel in Rust (llguidance's
        executor drops the GIL); the other rows, and a row whose grammar failed, allow every token."""
        start = time.perf_counter()
        if self.copied is not None:
            self.copied.synchronize()
        batch = [c for c in constraints if c is not None]
        buffer = self._buffer_for(len(constraints), batch[0].words)
        masks = buffer.numpy()
        try:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            pairs = [(c.matcher, r) for r, c in zip(rows, batch, strict=True)]
            self._executor.unsafe_compute_mask_ptr(pairs, masks.ctypes.data, masks.shape[1] * 4, len(masks))
            errors = [c.error for c in batch]
        except Exception:  # one matcher's failure must not fail the others: fill them one by one
            logger.exception("filling %d masks as a batch failed; filling them one by one", len(batch))
            errors = fill_one_by_one(batch, [masks[r] for r in rows])
        open_rows = [r for r, error in zip(rows, errors, strict=True) if error is not None]
        if len(rows) < len(constraints):
            open_rows += [i for i, c in enumerate(constraints) if c is None]
        if open_rows:
            masks[open_rows] = -1
        return _Filled(errors, buffer, time.perf_counter() - start)
