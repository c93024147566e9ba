"""Write a random gpt-oss checkpoint in exactly the published format, so everything can be tested offline.

    python -m model.make_checkpoint --preset tiny|20b|120b --layout hf|original --seed S --out DIR
        [--layers N --experts E --hidden-size H ... (custom sizes)] [--norm-dtype bf16|fp32]
        [--max-shard-mb MB]

Names, shapes, dtypes and `config.json` are those of the published checkpoints (see model/weights.py). The
MoE experts are MXFP4: random e2m1 codes with per-block e8m0 scales chosen so each weight has about
1/√fan_in standard deviation, as a trained model would (scales jitter ±1 around that). Every tensor is
drawn from its own generator seeded by (seed, canonical name), so a checkpoint is deterministic
per seed and both layouts written with one seed hold the same numbers. Checkpoints larger than one
shard are split into `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import PRESETS, ModelConfig
from model.weights import BYTES, INDEX_FILE, Layout, TensorSpec, expected_tensors, hf_names

logger = logging.getLogger(__name__)

# Root-mean-square of the 16 e2m1 codes drawn uniformly: sqrt(mean(v²)) over {0, .5, 1, 1.5, 2, 3, 4, 6}.
_FP4_RMS = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_tensor(spec: TensorSpec, seed: int, norm_dtype: torch.dtype) -> torch.Tensor:
    """The canonical tensor `spec.name` of the checkpoint with `seed`."""
    g = _generator(seed, spec.name)
    name, shape = spec.name, spec.shape
    if name.endswith(".blocks"):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if name.endswith(".scales"):
        fan_in = shape[-1] * 32
        centre = 127 + round(math.log2(1.0 / (math.sqrt(fan_in) * _FP4_RMS)))
        return (centre + torch.randint(-1, 2, shape, generator=g)).to(torch.uint8)
    if name.endswith(".scale"):  # RMSNorm gains
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(norm_dtype)
    if name.endswith("sinks"):
        return torch.randn(shape, generator=g).to(norm_dtype)
    if name.endswith("bias"):
        return (0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    if name == "embedding.weight":
        return torch.randn(shape, generator=g).to(torch.bfloat16)
    # Linear weights [out, in]: unit-variance outputs for unit-variance inputs.
    return (torch.randn(shape, generator=g) / math.sqrt(shape[-1])).to(torch.bfloat16)


def _tensors_in_layout(
    config: ModelConfig, layout: Layout, norm_dtype: torch.dtype
) -> list[tuple[str, int, TensorSpec]]:
    """(file tensor name, its byte size, the canonical spec it comes from) in checkpoint order."""
    out = []
    splits = (config.q_size, config.kv_size, config.kv_size)
    norm_code = "F32" if norm_dtype == torch.float32 else "BF16"
    for spec in expected_tensors(config).values():
        dtype = norm_code if len(spec.dtypes) > 1 else spec.dtypes[0]
        numel = math.prod(spec.shape)
        if layout is Layout.ORIGINAL:
            out.append((spec.name, numel * BYTES[dtype], spec))
            continue
        names = hf_names(spec.name)
        if len(names) == 1:
            out.append((names[0], numel * BYTES[dtype], spec))
        else:
            per_row = numel // spec.shape[0]
            out += [(n, rows * per_row * BYTES[dtype], spec) for n, rows in zip(names, splits, strict=True)]
    return out


def write_checkpoint(
    config: ModelConfig,
    out: str | Path,
    *,
    layout: Layout | str = Layout.HF,
    seed: int = 0,
    norm_dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write `config.json` and the safetensors files of a random checkpoint into `out`; returns `out`."""
    layout = Layout(layout)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_json = config.to_hf_json() if layout is Layout.HF else config.to_original_json()
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")

    entries = _tensors_in_layout(config, layout, norm_dtype)
    shards: list[list[tuple[str, int, TensorSpec]]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[1] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[1]

    splits = (config.q_size, config.kv_size, config.kv_size)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        filename = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors: dict[str, torch.Tensor] = {}
        cache: dict[str, torch.Tensor] = {}
        for file_name, _, spec in shard:
            if spec.name not in cache:
                cache = {spec.name: random_tensor(spec, seed, norm_dtype)}  # keep only the current one
            full = cache[spec.name]
            if file_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                                   "v_proj.weight", "v_proj.bias")):  # fmt: skip
                which = "qkv".index(file_name.rsplit(".", 2)[-2][0])
                start = sum(splits[:which])
                tensors[file_name] = full[start : start + splits[which]].clone()
            else:
                tensors[file_name] = full
            weight_map[file_name] = filename
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        logger.info("wrote %s (%d tensors)", filename, len(tensors))
    if len(shards) > 1:
        total = sum(entry[1] for entry in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.make_checkpoint", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layout", choices=[x.value for x in Layout], default=Layout.HF.value)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--norm-dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--max-shard-mb", type=int, default=4096)
    overrides = {
        "layers": "num_hidden_layers",
        "experts": "num_experts",
        "experts-per-token": "experts_per_token",
        "hidden-size": "hidden_size",
        "intermediate-size": "intermediate_size",
        "heads": "num_attention_heads",
        "kv-heads": "num_key_value_heads",
        "head-dim": "head_dim",
        "vocab-size": "vocab_size",
        "sliding-window": "sliding_window",
    }
    for flag in overrides:
        parser.add_argument(f"--{flag}", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    changes = {
        field: getattr(args, flag.replace("-", "_"))
        for flag, field in overrides.items()
        if getattr(args, flag.replace("-", "_")) is not None
    }
    base = PRESETS[args.preset]
    if "num_hidden_layers" in changes:
        changes["layer_sliding"] = ()  # re-derive the alternating pattern for the new depth
    config = dataclasses.replace(base, **changes)
    path = write_checkpoint(
        config,
        args.out,
        layout=args.layout,
        seed=args.seed,
        norm_dtype=torch.float32 if args.norm_dtype == "fp32" else torch.bfloat16,
        max_shard_bytes=args.max_shard_mb << 20,
    )
    logger.info("checkpoint written to %s", path)


if __name__ == "__main__":
    main()
