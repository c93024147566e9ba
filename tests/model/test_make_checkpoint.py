"""The checkpoint writer: published names, shapes and dtypes, realistic MXFP4 scales, determinism, the CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.config import PRESETS, ModelConfig
from model.kernels.mxfp4 import dequantize
from model.make_checkpoint import main, write_checkpoint
from model.weights import expected_tensors, hf_specs


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_hf_layout_of_20b_has_the_published_tensors() -> None:
    specs = hf_specs(PRESETS["20b"])
    assert len(specs) == 3 + 24 * 19
    assert specs["model.embed_tokens.weight"].shape == (201088, 2880)
    assert specs["model.layers.23.self_attn.q_proj.weight"].shape == (4096, 2880)
    assert specs["model.layers.0.self_attn.k_proj.bias"].shape == (512,)
    assert specs["model.layers.0.self_attn.o_proj.weight"].shape == (2880, 4096)
    assert specs["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (32, 5760, 90, 16)
    assert specs["model.layers.0.mlp.experts.gate_up_proj_scales"].dtypes == ("U8",)
    assert specs["model.layers.0.mlp.experts.down_proj_blocks"].shape == (32, 2880, 90, 16)
    assert specs["model.layers.0.mlp.router.weight"].shape == (32, 2880)
    assert specs["lm_head.weight"].shape == (201088, 2880)
    original = expected_tensors(PRESETS["120b"])
    assert original["block.35.attn.qkv.weight"].shape == (5120, 2880)
    assert original["block.0.mlp.mlp1_weight.blocks"].shape == (128, 5760, 90, 16)


def test_20b_parameter_count_matches_the_model_card() -> None:
    # 20.91 B parameters, counting each MXFP4 byte as two values and ignoring the scales.
    total = 0
    for spec in expected_tensors(PRESETS["20b"]).values():
        if spec.name.endswith(".scales"):
            continue
        total += math.prod(spec.shape) * (2 if spec.name.endswith(".blocks") else 1)
    assert round(total / 1e9, 2) == 20.91


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_written_tensors_have_the_published_names_shapes_and_dtypes(
    checkpoints: dict[str, Path], tiny_config: ModelConfig, layout: str
) -> None:
    specs = hf_specs(tiny_config) if layout == "hf" else expected_tensors(tiny_config)
    dtypes = {"BF16": torch.bfloat16, "U8": torch.uint8}
    with safe_open(str(checkpoints[layout] / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(specs)
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = f.get_tensor(name)
            assert tuple(tensor.shape) == specs[name].shape, name
            assert tensor.dtype == dtypes[specs[name].dtypes[0]], name
    config = json.loads((checkpoints[layout] / "config.json").read_text())
    assert ModelConfig.from_dict(config) == tiny_config


def test_mxfp4_scales_give_weights_of_realistic_size(
    checkpoints: dict[str, Path], tiny_config: ModelConfig
) -> None:
    with safe_open(str(checkpoints["original"] / "model.safetensors"), framework="pt") as f:
        for matmul, fan_in in (("mlp1", tiny_config.hidden_size), ("mlp2", tiny_config.intermediate_size)):
            blocks = f.get_tensor(f"block.0.mlp.{matmul}_weight.blocks")
            scales = f.get_tensor(f"block.0.mlp.{matmul}_weight.scales")
            assert len(scales.unique()) == 3  # jittered by ±1 around the centre
            std = dequantize(blocks, scales, torch.float32).std().item()
            assert 0.5 / math.sqrt(fan_in) < std < 2 / math.sqrt(fan_in)


def test_deterministic_per_seed_and_layout_independent_values(
    tiny_config: ModelConfig, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    again = write_checkpoint(tiny_config, tmp_path / "again", layout="hf", seed=1234)
    other = write_checkpoint(tiny_config, tmp_path / "other", layout="hf", seed=1235)
    assert digest(again) == digest(checkpoints["hf"])
    assert digest(other) != digest(checkpoints["hf"])
    with (
        safe_open(str(checkpoints["hf"] / "model.safetensors"), framework="pt") as hf,
        safe_open(str(checkpoints["original"] / "model.safetensors"), framework="pt") as original,
    ):
        qkv = original.get_tensor("block.1.attn.qkv.weight")
        q, k = (
            hf.get_tensor("model.layers.1.self_attn.q_proj.weight"),
            hf.get_tensor("model.layers.1.self_attn.k_proj.weight"),
        )
        assert torch.equal(qkv[: tiny_config.q_size], q)
        assert torch.equal(qkv[tiny_config.q_size : tiny_config.q_size + tiny_config.kv_size], k)
        assert torch.equal(
            original.get_tensor("block.2.mlp.mlp2_weight.blocks"),
            hf.get_tensor("model.layers.2.mlp.experts.down_proj_blocks"),
        )


def test_command_line_with_custom_sizes(tmp_path: Path) -> None:
    args = "--preset tiny --layout original --seed 3 --layers 3 --experts 6 --vocab-size 1000"
    main([*args.split(), "--sliding-window", "8", "--norm-dtype", "fp32", "--out", str(tmp_path)])
    config = ModelConfig.from_file(tmp_path / "config.json")
    assert (config.num_hidden_layers, config.num_experts, config.vocab_size) == (3, 6, 1000)
    assert config.layer_sliding == (True, False, True)
    assert config.sliding_window == 8
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("norm.scale").dtype == torch.float32
        assert f.get_tensor("block.2.mlp.gate.weight").shape == (6, 64)
