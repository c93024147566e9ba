"""Finding, validating and loading gpt-oss safetensors checkpoints in either published layout.

Canonical tensor names are the `original/` layout's (``block.N.attn.qkv.weight`` ...), which are also the
module names of :mod:`model.gpt_oss`. The Hugging Face layout is mapped onto them; its only real
transform is that ``q_proj``, ``k_proj`` and ``v_proj`` are concatenated (in that order) into ``qkv``.
MXFP4 expert bytes are identical in both layouts.

**Fine-tunes.** A Hugging Face checkpoint saved after training (transformers dequantizes the experts to train
them) holds the experts as plain tensors, ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``, instead of
MXFP4 blocks and scales. They read as the canonical ``mlp1_weight.dense [E, 2I, H]`` and
``mlp2_weight.dense [E, H, I]`` (transposed to the model's ``[out, in]``).

Every tensor is checked against the shape and dtype the config implies *before* any data is read, and every
file against its own header (a truncated file is caught here), so a bad checkpoint fails with a message
naming the tensor rather than deep inside a matmul.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from model import host_memory
from model.config import MXFP4_BLOCK, ModelConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"

# The safetensors dtypes gpt-oss uses, and their bytes per element.
TORCH_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16, "U8": torch.uint8}
BYTES: dict[str, int] = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}


class Layout(StrEnum):
    HF = "hf"
    ORIGINAL = "original"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the tensor or file at fault."""


@dataclass(slots=True, frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


# -- what a checkpoint must contain --


def expected_tensors(config: ModelConfig, dense_experts: bool = False) -> dict[str, TensorSpec]:
    """Canonical (original-layout) name → the shape and allowed dtypes the config implies; `dense_experts`:
    the experts as plain tensors (a fine-tune), not MXFP4."""
    h, v, e = config.hidden_size, config.vocab_size, config.num_experts
    i2, i = 2 * config.intermediate_size, config.intermediate_size
    bf16, norm = ("BF16",), ("BF16", "F32")  # norm and sink dtypes of the real checkpoints are unverified
    specs = [TensorSpec("embedding.weight", (v, h), bf16)]
    for n in range(config.num_hidden_layers):
        b = f"block.{n}"
        specs += [
            TensorSpec(f"{b}.attn.norm.scale", (h,), norm),
            TensorSpec(f"{b}.attn.qkv.weight", (config.qkv_size, h), bf16),
            TensorSpec(f"{b}.attn.qkv.bias", (config.qkv_size,), bf16),
            TensorSpec(f"{b}.attn.sinks", (config.num_attention_heads,), norm),
            TensorSpec(f"{b}.attn.out.weight", (h, config.q_size), bf16),
            TensorSpec(f"{b}.attn.out.bias", (h,), bf16),
            TensorSpec(f"{b}.mlp.norm.scale", (h,), norm),
            TensorSpec(f"{b}.mlp.gate.weight", (e, h), bf16),
            TensorSpec(f"{b}.mlp.gate.bias", (e,), bf16),
            TensorSpec(f"{b}.mlp.mlp1_bias", (e, i2), bf16),
            TensorSpec(f"{b}.mlp.mlp2_bias", (e, h), bf16),
        ]
        if dense_experts:
            specs += [
                TensorSpec(f"{b}.mlp.mlp1_weight.dense", (e, i2, h), DENSE),
                TensorSpec(f"{b}.mlp.mlp2_weight.dense", (e, h, i), DENSE),
            ]
        else:
            specs += [
                TensorSpec(f"{b}.mlp.mlp1_weight.blocks", (e, i2, h // MXFP4_BLOCK, 16), ("U8",)),
                TensorSpec(f"{b}.mlp.mlp1_weight.scales", (e, i2, h // MXFP4_BLOCK), ("U8",)),
                TensorSpec(f"{b}.mlp.mlp2_weight.blocks", (e, h, i // MXFP4_BLOCK, 16), ("U8",)),
                TensorSpec(f"{b}.mlp.mlp2_weight.scales", (e, h, i // MXFP4_BLOCK), ("U8",)),
            ]
    specs += [TensorSpec("norm.scale", (h,), norm), TensorSpec("unembedding.weight", (v, h), bf16)]
    return {s.name: s for s in specs}


# Dtypes a fine-tune may save its plain expert weights in.
DENSE = ("BF16", "F32", "F16")

_HF_BLOCK = {
    "attn.norm.scale": "input_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight",
    "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias",
    "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales",
    "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks",
    "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
    "mlp.mlp1_weight.dense": "mlp.experts.gate_up_proj",
    "mlp.mlp2_weight.dense": "mlp.experts.down_proj",
}
# HF tensors stored [E, in, out] where the model holds [E, out, in].
_HF_TRANSPOSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_HF_TOP = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight",
           "unembedding.weight": "lm_head.weight"}  # fmt: skip
_BLOCK_NAME = re.compile(r"block\.(\d+)\.(.+)")


def hf_names(name: str) -> tuple[str, ...]:
    """The HF-layout tensor(s) a canonical tensor is made of (q, k, v for the fused qkv)."""
    if name in _HF_TOP:
        return (_HF_TOP[name],)
    match = _BLOCK_NAME.fullmatch(name)
    if match is None:
        raise KeyError(name)
    n, rest = match.groups()
    prefix = f"model.layers.{n}."
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return tuple(f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv")
    return (prefix + _HF_BLOCK[rest],)


def _transposed(hf_name: str) -> bool:
    return hf_name.endswith(_HF_TRANSPOSED)


def hf_specs(config: ModelConfig, dense_experts: bool = False) -> dict[str, TensorSpec]:
    """HF-layout name → shape and dtypes, derived from the canonical specs."""
    out: dict[str, TensorSpec] = {}
    splits = (config.q_size, config.kv_size, config.kv_size)
    for spec in expected_tensors(config, dense_experts).values():
        names = hf_names(spec.name)
        if len(names) == 1:
            shape = (spec.shape[0], spec.shape[2], spec.shape[1]) if _transposed(names[0]) else spec.shape
            out[names[0]] = TensorSpec(names[0], shape, spec.dtypes)
        else:
            for hf_name, rows in zip(names, splits, strict=True):
                out[hf_name] = TensorSpec(hf_name, (rows, *spec.shape[1:]), spec.dtypes)
    return out


# -- locating a checkpoint --


@dataclass(slots=True, frozen=True)
class CheckpointFiles:
    root: Path
    layout: Layout
    config: ModelConfig
    files: tuple[Path, ...]
    dense_experts: bool = False  # the experts as plain tensors (a fine-tune), not MXFP4


def find_checkpoint(path: str | Path) -> CheckpointFiles:
    """A directory holding `config.json` and safetensors, or one whose `original/` subdirectory does."""
    root = Path(path)
    candidates = [root, root / "original"]
    for directory in candidates:
        if (directory / "config.json").is_file() and _safetensors_files(directory):
            config = ModelConfig.from_file(directory / "config.json")
            files = _safetensors_files(directory)
            names = {name for f in files for name in read_header(f)[0]}
            layout = Layout.HF if any(n.startswith("model.") for n in names) else Layout.ORIGINAL
            dense = layout is Layout.HF and any(n.endswith(".mlp.experts.gate_up_proj") for n in names)
            return CheckpointFiles(directory, layout, config, files, dense)
    raise CheckpointError(f"{root}: no config.json with safetensors files here or in {root / 'original'}")


def _safetensors_files(directory: Path) -> tuple[Path, ...]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
        return tuple(directory / f for f in sorted(set(weight_map.values())))
    return tuple(sorted(directory.glob("*.safetensors")))


HF_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", INDEX_FILE)
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(model: str, *, cache_dir: str | None = None, offline: bool | None = None) -> Path:
    """`--model`: an existing local directory, else a Hugging Face repo id fetched with huggingface_hub.

    Only the HF layout at the repo root is fetched (not `original/` or the Metal weights). When offline
    (``offline=True`` or ``HF_HUB_OFFLINE=1``) an id resolves only from the local Hugging Face cache.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if not _HF_ID.fullmatch(model) or model.startswith((".", "/", "~")):
        raise CheckpointError(f"--model {model!r}: not a directory and not a Hugging Face id (owner/name)")
    from huggingface_hub import snapshot_download

    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    logger.info("resolving %s from the Hugging Face Hub (offline=%s)", model, offline)
    try:
        snapshot = snapshot_download(
            repo_id=model, allow_patterns=list(HF_PATTERNS), cache_dir=cache_dir, local_files_only=offline
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not available"
        raise CheckpointError(f"--model {model!r}: could not fetch from the Hugging Face Hub: {exc}") from exc
    return Path(snapshot)


# -- reading and validating safetensors --


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name → {dtype, shape, data_offsets}, byte offset where the data starts) of one file."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated before its safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < length:
        raise CheckpointError(f"{path}: truncated inside its safetensors header")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    return header, 8 + length


def _validate_file(
    path: Path, header: dict[str, dict], data_start: int, specs: dict[str, TensorSpec]
) -> None:
    size = path.stat().st_size
    for name, entry in header.items():
        spec = specs.get(name)
        if spec is not None:
            shape = tuple(entry["shape"])
            if shape != spec.shape:
                raise CheckpointError(
                    f"{name} in {path.name}: shape {list(shape)}, expected {list(spec.shape)}"
                )
            if entry["dtype"] not in spec.dtypes:
                raise CheckpointError(
                    f"{name} in {path.name}: dtype {entry['dtype']}, expected {' or '.join(spec.dtypes)}"
                )
        start, end = entry["data_offsets"]
        nbytes = BYTES.get(entry["dtype"], 0) * _numel(entry["shape"])
        if nbytes and end - start != nbytes:
            raise CheckpointError(f"{name} in {path.name}: {end - start} bytes for {nbytes} bytes of data")
        if data_start + end > size:
            raise CheckpointError(
                f"{name} in {path.name}: file truncated ({size} bytes; the tensor ends at byte "
                f"{data_start + end})"
            )


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class CheckpointReader:
    """Validated access to the tensors of one checkpoint, by canonical name."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files
        self.layout = files.layout
        canonical = expected_tensors(files.config, files.dense_experts)
        specs = canonical if files.layout is Layout.ORIGINAL else hf_specs(files.config, files.dense_experts)
        self._where: dict[str, Path] = {}
        self._entries: dict[str, dict] = {}  # name → its header entry: dtype, shape, data_offsets
        self._data_start: dict[Path, int] = {}
        for path in files.files:
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but missing")
            header, data_start = read_header(path)
            _validate_file(path, header, data_start, specs)
            self._data_start[path] = data_start
            for name, entry in header.items():
                self._where[name] = path
                self._entries[name] = entry
        for name in specs:
            if name not in self._where:
                raise CheckpointError(f"{name}: missing from the checkpoint at {files.root}")
        extra = sorted(set(self._where) - set(specs))
        if extra:
            logger.warning("ignoring %d unexpected tensors, e.g. %s", len(extra), extra[0])
        self.names = tuple(canonical)
        self.specs = canonical
        self.nbytes = sum(p.stat().st_size for p in files.files)

    def _raw(self, name: str, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self._read(name)
        # safe_open memory-maps the file; only the requested tensor's bytes are read and placed on `device`.
        # It is given an explicit index ("cuda:0"), which every safetensors release parses.
        if device.index is None:
            device = torch.device(device.type, getattr(torch, device.type).current_device())
        with safe_open(str(self._where[name]), framework="pt", device=str(device)) as f:
            return f.get_tensor(name)

    def _read(self, name: str) -> torch.Tensor:
        """Tensor `name` read from its file into memory of its own, on huge pages where it is large
        (:func:`model.host_memory.huge_empty`: a decode step streams it).

        Not a view of the file's mapping (safetensors' CPU tensors are): the kernel may drop such pages
        under memory pressure and read them back on the next touch, so a decode step, which touches one
        embedding row and the active experts' scales, would wait on the disk; and RSS would leave out the
        pages never touched.

        The file's pages just read are then dropped from the page cache (``POSIX_FADV_DONTNEED``): the bytes
        now live in the tensor. Kept, a checkpoint's worth of cached file pages filled the free memory and
        scattered what was left, and the later tensors' huge pages could not be found: loading the 20b on a
        24 GB machine left 25-77% of the unembedding and about a quarter of the experts on 4 KB pages;
        dropped, all of them were on 2 MB pages (benchmarks/README.md). The cost is that a second load reads
        the file from disk again."""
        path = self._where[name]
        entry = self._entries[name]
        tensor = host_memory.huge_empty(tuple(entry["shape"]), TORCH_DTYPES[entry["dtype"]])
        start, end = entry["data_offsets"]
        if end == start:
            return tensor
        view = memoryview((ctypes.c_char * (end - start)).from_address(tensor.data_ptr())).cast("B")
        offset = self._data_start[path] + start
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            done = 0
            while done < len(view):
                count = f.readinto(view[done:])
                if not count:
                    raise CheckpointError(f"{name} in {path.name}: file truncated while reading")
                done += count
            if hasattr(os, "posix_fadvise"):  # not on macOS, whose page cache is its own affair
                os.posix_fadvise(f.fileno(), offset, end - start, os.POSIX_FADV_DONTNEED)
        return tensor

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        """A canonical tensor, in its checkpoint dtype, on `device` (qkv is assembled for the HF layout); on
        the CPU in memory of its own (:meth:`_read`)."""
        if self.layout is Layout.ORIGINAL:
            return self._raw(name, device)
        names = hf_names(name)
        parts = [self._raw(n, device) for n in names]
        if len(parts) > 1:
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            out = host_memory.huge_empty(shape, parts[0].dtype) if device.type == "cpu" else None
            return torch.cat(parts, dim=0, out=out)
        return parts[0].transpose(1, 2).contiguous() if _transposed(names[0]) else parts[0]

    def items(self, device: torch.device, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        bar = tqdm(self.names, desc="loading weights", unit="tensor", disable=not progress)
        for name in bar:
            yield name, self.get(name, device)


def open_checkpoint(path: str | Path) -> CheckpointReader:
    files = find_checkpoint(path)
    logger.info(
        "checkpoint %s: %s layout, %d file(s)%s",
        files.root,
        files.layout.value,
        len(files.files),
        ", plain (fine-tuned) experts" if files.dense_experts else "",
    )
    return CheckpointReader(files)
