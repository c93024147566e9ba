"""Constrained decoding: a request's grammar, as the mask of the tokens it allows next.

A :class:`GrammarConstraint` wraps one request's llguidance matcher. A step's masks are computed while the
model computes the step: :meth:`TokenMasker.start` hands the constrained rows' matchers (advanced with the
previous step's tokens) to a worker thread, which fills one int32 bitmask for all of them (bit i of word j
allows token 32·j + i, llguidance's layout) in Rust without the GIL and, for logits on the host, unpacks it
into the forbidden tokens. After the forward, :meth:`StepMasks.apply` waits for that and sets every forbidden
logit to -inf in one batched operation on the logits' device, outside the model (so a captured decode graph
never sees a mask); after sampling the token advances the matcher. The engine knows nothing of what the
grammar says (harmony, JSON): it only fills and applies masks.
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


_BITS = torch.arange(32, dtype=torch.int32)


@dataclass(frozen=True, slots=True)
class SparseMasks:
    """A step's masks for logits on the host, as the few logits to change. A grammar mostly allows almost
    every token (free text, a JSON string) or almost none (JSON structure, a header), so each row is
    written the short way: the tokens it forbids, or, for a row that forbids most, the row closed and the
    tokens it allows put back. Indices are flat, row·vocab + token, into the step's [batch, vocab] logits.
    A masked fill over the whole row costs several times more on a CPU: its branch on each scattered bit
    mispredicts."""

    deny: torch.Tensor  # int64: logits to set to -inf
    closed_rows: torch.Tensor  # int64: rows set to -inf but for `keep`
    keep: torch.Tensor  # int64: logits of the closed rows that keep their value


def _set_bits(words: np.ndarray, rows: np.ndarray, vocab: int) -> np.ndarray:
    """Flat indices rows[r]·vocab + token of the bits set in `words` (int32 [len(rows), W]), tokens under
    `vocab`. Only the words with a bit set are read, one lowest set bit of each per pass (a word holds few:
    this is the short side of its row), rather than unpacking all 32 bits of each."""
    r, w = np.nonzero(words)
    value = words[r, w].view(np.uint32)
    base = rows[r] * vocab + w.astype(np.int64) * 32
    found: list[np.ndarray] = []
    while value.size:
        lowest = value & (~value + np.uint32(1))
        token_offset = np.bitwise_count(lowest - np.uint32(1)).astype(np.int64)
        inside = (w.astype(np.int64) * 32 + token_offset) < vocab
        found.append((base + token_offset)[inside])
        value = value ^ lowest
        more = value != 0
        value, base, w = value[more], base[more], w[more]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def sparse_masks(masks: np.ndarray, rows: list[int], vocab: int) -> SparseMasks:
    """`masks` (int32 [len(rows), words], row r the mask of logits row rows[r]) as :class:`SparseMasks`."""
    at = np.asarray(rows, dtype=np.int64)
    # Which way is shorter only decides the cost, not the result: the bits past `vocab` may count.
    mostly_closed = np.bitwise_count(masks.view(np.uint32)).sum(axis=1, dtype=np.int64) * 2 < vocab
    deny = _set_bits(~masks[~mostly_closed], at[~mostly_closed], vocab)
    keep = _set_bits(masks[mostly_closed], at[mostly_closed], vocab)
    return SparseMasks(torch.from_numpy(deny), torch.from_numpy(at[mostly_closed]), torch.from_numpy(keep))


def apply_sparse(logits: torch.Tensor, masks: SparseMasks) -> None:
    """Apply `masks` to `logits` (contiguous, on the host), in place."""
    assert logits.is_contiguous(), "flat indices address a contiguous [batch, vocab] tensor"
    flat = logits.view(-1)
    kept = flat[masks.keep]
    logits.index_fill_(0, masks.closed_rows, float("-inf"))
    flat[masks.keep] = kept
    flat.index_fill_(0, masks.deny, float("-inf"))


def forbidden_on_device(masks: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """bool [n, vocab] on `device`: the tokens the masks forbid, each word shifted by 0..31 there (one small
    copy of the packed words, the unpacking on the device)."""
    bits = (masks.to(device, non_blocking=True)[:, :, None] >> _BITS.to(device)) & 1  # [n, words, 32]
    return bits.flatten(1)[:, :vocab] == 0


def apply_forbidden(logits: torch.Tensor, rows: list[int], forbidden: torch.Tensor) -> None:
    """Set to -inf, in place, the logits of `rows` (distinct, increasing) that `forbidden` (bool
    [len(rows), >= vocab], on the logits' device) marks; the other rows are untouched. Every row: one masked
    fill in place; some rows: one gather, fill and scatter (one launch each)."""
    vocab = logits.shape[1]
    assert forbidden.shape[1] >= vocab, "a mask covers every token the model has"
    forbidden = forbidden[:, :vocab]
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


def apply_token_masks(logits: torch.Tensor, rows: list[int], masks: np.ndarray) -> None:
    """Set to -inf, in place, the logits of `rows` (distinct, increasing) whose tokens their masks (int32
    [len(rows), words], on the host) do not allow: on the host as :class:`SparseMasks`, on a device unpacked
    there and applied with :func:`apply_forbidden`."""
    vocab = logits.shape[1]
    if logits.device.type == "cpu":
        apply_sparse(logits, sparse_masks(masks, rows, vocab))
    else:
        apply_forbidden(logits, rows, forbidden_on_device(torch.from_numpy(masks), vocab, logits.device))


def apply_token_masks_reference(logits: torch.Tensor, rows: list[int], masks: np.ndarray) -> None:
    """Plain twin of :func:`apply_token_masks`: token by token, bit by bit."""
    for r, row in enumerate(rows):
        for token in range(logits.shape[1]):
            word, bit = divmod(token, 32)
            if not (int(masks[r, word]) >> bit) & 1:
                logits[row, token] = float("-inf")


def fill_one_by_one(constraints: list[GrammarConstraint], masks: np.ndarray) -> list[str | None]:
    """The worker's fallback when the batched fill raises: one matcher at a time into its row of `masks`, so
    that one matcher's failure fails its own row only; per row, why its constraint failed, or None."""
    errors: list[str | None] = []
    for r, constraint in enumerate(constraints):
        try:
            constraint.fill(masks[r])
            errors.append(constraint.error)
        except Exception as error:  # the request's own grammar: it fails alone
            errors.append(f"{type(error).__name__}: {error}")
    return errors


@dataclass(slots=True)
class _Filled:
    """What the worker hands back for one step: per constrained row its error (None when its mask holds),
    and either the masks as sparse edits of host logits or the packed masks (int32 [n, words], pinned for a
    copy to the device)."""

    errors: list[str | None]
    sparse: SparseMasks | None
    packed: torch.Tensor | None
    seconds: float


@dataclass(slots=True)
class StepMasks:
    """One step's masks in the making: `rows` are the logits rows that have a grammar."""

    rows: list[int]
    future: Future[_Filled]
    masker: TokenMasker
    # Seconds the worker spent filling (and unpacking), and the engine thread waiting for it and applying.
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
        if filled.sparse is not None:
            assert logits.shape[1] == self.masker.vocab, "flat indices were computed for this vocabulary"
            apply_sparse(logits, filled.sparse)
        else:
            assert filled.packed is not None
            forbidden = forbidden_on_device(filled.packed, logits.shape[1], logits.device)
            apply_forbidden(logits, self.rows, forbidden)
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
    step's masks are in the making at a time, so the buffer needs no lock. Masks for logits on the host are
    unpacked on the worker too; for a device, the packed words are copied there from pinned memory and
    unpacked there."""

    def __init__(self, device: torch.device, vocab: int) -> None:
        self.device = device
        self.vocab = vocab
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-masks")
        self._executor: llguidance.LLExecutor | None = None
        self._buffer = torch.empty((0, 0), dtype=torch.int32)
        # Recorded after each copy of the buffer to the device: the next fill waits for it.
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    def start(self, constraints: list[GrammarConstraint | None]) -> StepMasks | None:
        """Begin the masks of a step whose logits row i samples for `constraints[i]` (None: no grammar);
        None when no row has one."""
        rows = [i for i, c in enumerate(constraints) if c is not None]
        if not rows:
            return None
        batch = [c for c in constraints if c is not None]
        return StepMasks(rows, self._pool.submit(self._fill, batch, rows), self)

    def _buffer_for(self, rows: int, words: int) -> torch.Tensor:
        """The first `rows` rows of the masks' buffer (grown on demand, pinned when they go to a device)."""
        if self._buffer.shape[0] < rows or self._buffer.shape[1] != words:
            self._buffer = torch.empty(
                (max(rows, self._buffer.shape[0]), words),
                dtype=torch.int32,
                pin_memory=self.device.type == "cuda",
            )
        return self._buffer[:rows]

    def _fill(self, constraints: list[GrammarConstraint], rows: list[int]) -> _Filled:
        """On the worker: every row's mask into one buffer, in parallel in Rust (llguidance's executor drops
        the GIL), then, for host logits, turned into sparse edits of logits `rows`."""
        start = time.perf_counter()
        if self.copied is not None:
            self.copied.synchronize()
        buffer = self._buffer_for(len(constraints), constraints[0].words)
        masks = buffer.numpy()
        try:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            pairs = [(c.matcher, r) for r, c in enumerate(constraints)]
            self._executor.unsafe_compute_mask_ptr(pairs, masks.ctypes.data, masks.shape[1] * 4, len(pairs))
            errors = [c.error for c in constraints]
        except Exception:  # one matcher's failure must not fail the others: fill them one by one
            logger.exception("filling %d masks as a batch failed; filling them one by one", len(constraints))
            errors = fill_one_by_one(constraints, masks)
        for r, error in enumerate(errors):
            if error is not None:
                masks[r] = -1  # the row fails; a full mask leaves its logits as they are
        if self.device.type == "cpu":
            sparse = sparse_masks(masks, rows, self.vocab)
            return _Filled(errors, sparse, None, time.perf_counter() - start)
        return _Filled(errors, None, buffer, time.perf_counter() - start)
