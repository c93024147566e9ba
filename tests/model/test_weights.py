"""Loading checkpoints: sharding, norm dtypes, bad checkpoints named precisely, and `--model` resolution."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.gpt_oss import AttentionMetadata, GptOss
from model.make_checkpoint import write_checkpoint
from model.weights import (
    INDEX_FILE,
    CheckpointError,
    Layout,
    find_checkpoint,
    open_checkpoint,
    resolve_model,
)

SEED = 1234  # the session checkpoints' seed (tests/model/conftest.py)


def logits(path: Path, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    model = GptOss.from_checkpoint(path, dtype=torch.float32, progress=False, **kwargs)
    return model(ids, AttentionMetadata.build([len(ids)]))


IDS = torch.tensor([5, 199998, 17, 200002, 3, 3, 3, 42, 1000, 201087])


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_sharded_with_index_loads_like_one_file(
    tiny_config: ModelConfig, checkpoints: dict[str, Path], layout: str, tmp_path: Path
) -> None:
    out = write_checkpoint(tiny_config, tmp_path, layout=layout, seed=SEED, max_shard_bytes=8 << 20)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(t.nbytes for s in shards for t in load_file(s).values())
    assert torch.equal(logits(out, IDS), logits(checkpoints[layout], IDS))


def test_float32_norms_are_accepted(tiny_config: ModelConfig, tmp_path: Path) -> None:
    out = write_checkpoint(tiny_config, tmp_path, layout="hf", seed=SEED, norm_dtype=torch.float32)
    header = load_file(out / "model.safetensors")
    assert header["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert header["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    # The same seed with bf16 norms differs only by the norms' rounding.
    bf16_norms = write_checkpoint(tiny_config, tmp_path / "bf16", layout="hf", seed=SEED)
    torch.testing.assert_close(logits(out, IDS), logits(bf16_norms, IDS), rtol=0, atol=0.2)


def test_a_directory_with_original_subdirectory_is_found(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    shutil.copytree(checkpoints["original"], tmp_path / "original")
    found = find_checkpoint(tmp_path)
    assert found.layout is Layout.ORIGINAL
    assert found.root == tmp_path / "original"


def rewrite(src: Path, dst: Path, edit: Any) -> Path:
    """Copy a single-file checkpoint into `dst`, passing its tensors dict through `edit`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


BAD = {
    "missing": (lambda t: t.pop(NAME), "missing"),
    "shape": (lambda t: t.__setitem__(NAME, t[NAME][:-1].clone()), "shape"),
    "dtype": (lambda t: t.__setitem__(NAME, t[NAME].float()), "dtype F32"),
}
NAME = "model.layers.2.self_attn.k_proj.weight"


@pytest.mark.parametrize("fault", sorted(BAD))
def test_bad_hf_checkpoint_fails_at_load_naming_the_tensor(
    checkpoints: dict[str, Path], tmp_path: Path, fault: str
) -> None:
    edit, what = BAD[fault]
    bad = rewrite(checkpoints["hf"], tmp_path / fault, edit)
    with pytest.raises(CheckpointError) as info:
        GptOss.from_checkpoint(bad, progress=False)
    assert NAME in str(info.value)
    assert what in str(info.value)


@pytest.mark.parametrize(
    ("name", "edit", "what"),
    [
        ("block.1.mlp.mlp2_weight.scales", lambda t, n: t.pop(n), "missing"),
        ("block.3.mlp.mlp1_weight.blocks", lambda t, n: t.__setitem__(n, t[n].view(torch.int8)), "dtype I8"),
        ("block.0.attn.sinks", lambda t, n: t.__setitem__(n, t[n][:2].clone()), "shape [2]"),
        ("unembedding.weight", lambda t, n: t.__setitem__(n, t[n].half()), "dtype F16"),
    ],
)
def test_bad_original_checkpoint_fails_at_load_naming_the_tensor(
    checkpoints: dict[str, Path], tmp_path: Path, name: str, edit: Any, what: str
) -> None:
    bad = rewrite(checkpoints["original"], tmp_path / "bad", lambda t: edit(t, name))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(bad)
    assert name in str(info.value)
    assert what in str(info.value)


def test_truncated_file_fails_naming_the_first_tensor_cut_off(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "truncated"
    shutil.copytree(checkpoints["hf"], bad)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    # Cut the file in the middle of the tensor that ends last.
    name, entry = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1])
    start, end = entry["data_offsets"]
    path.write_bytes(data[: 8 + length + (start + end) // 2])
    with pytest.raises(CheckpointError) as info:
        GptOss.from_checkpoint(bad, progress=False)
    assert name in str(info.value)
    assert "truncated" in str(info.value)


def test_shard_listed_in_index_but_absent_is_named(tiny_config: ModelConfig, tmp_path: Path) -> None:
    out = write_checkpoint(tiny_config, tmp_path, layout="hf", seed=SEED, max_shard_bytes=8 << 20)
    victim = sorted(out.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        open_checkpoint(out)


def test_no_checkpoint_in_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        open_checkpoint(tmp_path)


# -- --model resolution --


def test_local_directory_is_used_as_is(checkpoints: dict[str, Path]) -> None:
    assert resolve_model(str(checkpoints["hf"])) == checkpoints["hf"]


@pytest.mark.parametrize("offline", [False, True])
def test_hub_id_is_fetched_with_huggingface_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, offline: bool
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # so that no local "openai/gpt-oss-20b" directory can shadow the id
    assert resolve_model("openai/gpt-oss-20b", offline=offline, cache_dir="/c") == tmp_path
    (call,) = calls
    assert call["repo_id"] == "openai/gpt-oss-20b"
    assert call["local_files_only"] is offline
    assert call["cache_dir"] == "/c"
    patterns = call["allow_patterns"]
    assert "config.json" in patterns
    assert "*.safetensors" in patterns
    assert INDEX_FILE in patterns
    assert not any(p.startswith(("original", "metal")) for p in patterns)


def test_offline_environment_variable_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(
        "huggingface_hub.snapshot_download", lambda **kw: seen.append(kw["local_files_only"]) or str(tmp_path)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_model("openai/gpt-oss-120b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    resolve_model("openai/gpt-oss-120b")
    assert seen == [True, False]


def test_hub_failure_is_reported_with_the_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unreachable(**kwargs: Any) -> str:
        raise OSError("network is unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"openai/gpt-oss-20b.*unreachable"):
        resolve_model("openai/gpt-oss-20b")


@pytest.mark.parametrize("bad", ["/no/such/dir", "./missing", "not-an-id", "a/b/c"])
def test_neither_directory_nor_hub_id_is_refused(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_model(bad)


def file_mappings(paths: list[Path]) -> list[tuple[int, int]]:
    """The address ranges where this process maps any of `paths` (from /proc/self/maps)."""
    names = {str(p.resolve()) for p in paths}
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in names:
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_cpu_weights_own_their_memory(checkpoints: dict[str, Path], layout: str) -> None:
    """No weight of a CPU model is a view of the checkpoint's mapping: the kernel could drop such pages under
    memory pressure, and a decode step would then wait on the disk for one embedding row or expert's scales."""
    model = GptOss.from_checkpoint(checkpoints[layout], dtype=torch.bfloat16, progress=False)
    files = sorted(checkpoints[layout].rglob("*.safetensors"))
    tensors = [t for t in model.state_dict().values() if not t.is_mkldnn and t.numel()]
    for block in model.block:
        tensors += [block.mlp.mlp1_weight.blocks, block.mlp.mlp1_weight.scales]
        tensors += [block.mlp.mlp2_weight.blocks, block.mlp.mlp2_weight.scales]
    mapped = file_mappings(files)  # while the model lives: a view would keep its file mapped
    assert tensors
    for tensor in tensors:
        address = tensor.data_ptr()
        assert not any(start <= address < end for start, end in mapped)


def tensor_ranges(path: Path) -> set[tuple[int, int]]:
    """(offset in the file, length) of every non-empty tensor's bytes in a safetensors file."""
    with path.open("rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))
    ranges = set()
    for name, entry in header.items():
        start, end = entry["data_offsets"] if name != "__metadata__" else (0, 0)
        if end > start:
            ranges.add((8 + header_length + start, end - start))
    return ranges


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_cpu_reads_drop_the_file_pages_they_copied(
    checkpoints: dict[str, Path], layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading for the CPU reads every tensor of the checkpoint once and then tells the kernel to drop exactly
    those file pages from its cache: the bytes live in the tensor, and a checkpoint's worth of cached pages
    left no free 2 MB blocks for the later tensors' huge pages."""
    dropped: list[tuple[str, int, int, int]] = []
    fadvise = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        dropped.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    reader = open_checkpoint(checkpoints[layout])
    assert sum(1 for _ in reader.items(torch.device("cpu"), progress=False))
    files = sorted(checkpoints[layout].rglob("*.safetensors"))
    expected = {(str(f.resolve()), offset, length) for f in files for offset, length in tensor_ranges(f)}
    assert {advice for *_, advice in dropped} == {os.POSIX_FADV_DONTNEED}
    assert sorted((name, offset, length) for name, offset, length, _ in dropped) == sorted(expected)
