"""Fine-tunes: a Hugging Face checkpoint whose experts were saved as plain tensors after training, served as
is or rounded to MXFP4 at load, against transformers on the same checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM, Mxfp4Config

from model.batch import AttentionMetadata
from model.gpt_oss import GptOss
from model.kernels.mxfp4 import dequantize_reference
from model.weights import CheckpointError
from tests.model.test_oracles import prompt

logger = logging.getLogger(__name__)


def _transformers(path: Path, **kwargs: object) -> GptOssForCausalLM:
    model = GptOssForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    return model.eval()


@pytest.fixture(scope="module")
def finetune(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What training leaves: the published checkpoint dequantized by transformers, its experts and attention
    nudged off the MXFP4 grid (as gradient steps would), saved in bf16."""
    model = GptOssForCausalLM.from_pretrained(
        str(checkpoints["hf"]), dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts" in name or "q_proj" in name:
                noise = torch.randn(parameter.shape, generator=generator) * 0.02 * parameter.float().std()
                parameter.add_(noise.to(parameter.dtype))
    out = tmp_path_factory.mktemp("finetune")
    model.save_pretrained(str(out))
    return out


def test_plain_experts_are_served_as_they_are_and_match_transformers(finetune: Path) -> None:
    ours = GptOss.from_checkpoint(finetune, dtype=torch.float32, progress=False)
    mlp = ours.block[0].mlp
    assert mlp.mlp1_weight.dense is not None
    assert mlp.mlp1_weight.blocks.numel() == 0
    ids = prompt(21)
    expected = _transformers(finetune)(ids[None]).logits[0]
    got = ours(ids, AttentionMetadata.build([len(ids)]))
    assert (got - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()


def test_quantizing_at_load_keeps_the_packed_models_memory_and_drifts_little(
    finetune: Path, checkpoints: dict[str, Path]
) -> None:
    plain = GptOss.from_checkpoint(finetune, dtype=torch.float32, progress=False)
    packed = GptOss.from_checkpoint(finetune, dtype=torch.float32, quantize=True, progress=False)
    published = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    mlp = packed.block[0].mlp
    assert mlp.mlp1_weight.dense is None
    assert mlp.mlp1_weight.blocks.dtype == torch.uint8
    assert packed.weight_nbytes() == published.weight_nbytes()
    # The rounding itself: the experts' relative error, as any fresh MXFP4 rounding of such weights has
    # (about 12% for Gaussian weights: 4-bit values).
    dense = torch.stack(plain.block[0].mlp.mlp1_weight.dense)
    rounded_weight = dequantize_reference(mlp.mlp1_weight.blocks, mlp.mlp1_weight.scales, torch.float32)
    weight_error = ((rounded_weight - dense).norm() / dense.norm()).item()
    ids = prompt(22)
    meta = AttentionMetadata.build([len(ids)])
    exact, rounded = plain(ids, meta), packed(ids, meta)
    drift = ((rounded - exact).norm() / exact.norm()).item()
    agree = (rounded.argmax(-1) == exact.argmax(-1)).float().mean().item()
    logger.info(
        "MXFP4 at load: experts' rounding error %.4f, logit drift %.4f, top-1 agreement %.3f",
        weight_error,
        drift,
        agree,
    )
    assert 0 < weight_error < 0.2
    assert drift < 2 * weight_error  # the model does not amplify its weights' rounding
    assert agree > 0.5


def test_quantizing_weights_already_on_the_grid_gives_the_published_checkpoint_back(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The same rounding as the published checkpoints: experts dequantized and saved plain, then rounded at
    load, give back the original's logits bit for bit."""
    model = GptOssForCausalLM.from_pretrained(
        str(checkpoints["hf"]), dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True)
    )
    model.save_pretrained(str(tmp_path))
    ids = prompt(23)
    meta = AttentionMetadata.build([len(ids)])
    back = GptOss.from_checkpoint(tmp_path, dtype=torch.float32, quantize=True, progress=False)(ids, meta)
    original = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)(ids, meta)
    assert torch.equal(back, original)


def test_a_plain_expert_of_the_wrong_shape_is_named(finetune: Path, tmp_path: Path) -> None:
    for file in finetune.iterdir():
        target = tmp_path / file.name
        if file.suffix == ".safetensors":
            tensors = load_file(str(file))
            name = next(n for n in tensors if n.endswith("layers.1.mlp.experts.down_proj"))
            tensors[name] = tensors[name][:, :-1].contiguous()
            save_file(tensors, str(target), metadata={"format": "pt"})
        else:
            target.write_bytes(file.read_bytes())
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.down_proj.*shape"):
        GptOss.from_checkpoint(tmp_path, dtype=torch.float32, progress=False)
