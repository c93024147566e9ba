"""LoRA adapters in PEFT's format merged at load, against transformers + peft on the same base and adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM, Mxfp4Config

from model.batch import AttentionMetadata
from model.gpt_oss import GptOss
from model.kernels import Kernels
from model.kernels.experts import experts_batched
from model.lora import (
    AdapterError,
    ExpertLoraStack,
    expert_lora_delta_reference,
    lora_delta,
    lora_delta_reference,
    read_adapter,
)
from tests.model.test_oracles import prompt

logger = logging.getLogger(__name__)

TARGETS = {
    "attention": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "attention_qv": {"target_modules": ["q_proj", "v_proj"], "r": 8},
    "experts": {
        "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    },
    "everything": {
        "target_modules": ["q_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "use_rslora": True,
    },
}


def _base(path: Path) -> GptOssForCausalLM:
    return GptOssForCausalLM.from_pretrained(
        str(path),
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=Mxfp4Config(dequantize=True),
    ).eval()


@pytest.fixture(scope="module")
def adapters(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters made with peft on the published tiny checkpoint, their B matrices random (PEFT starts them
    at zero, which would make every adapter a no-op)."""
    out = {}
    for name, targets in TARGETS.items():
        model = get_peft_model(_base(checkpoints["hf"]), LoraConfig(**{"r": 4, "lora_alpha": 8, **targets}))
        generator = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        directory = tmp_path_factory.mktemp(f"lora-{name}")
        model.save_pretrained(str(directory))
        out[name] = directory
    return out


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_merged_adapter_gives_peft_s_logits(
    checkpoints: dict[str, Path], adapters: dict[str, Path], name: str
) -> None:
    peft_model = PeftModel.from_pretrained(_base(checkpoints["hf"]), str(adapters[name])).eval()
    ours = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, lora=adapters[name], progress=False)
    base = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    ids = prompt(31)
    meta = AttentionMetadata.build([len(ids)])
    with torch.no_grad():
        expected = peft_model(input_ids=ids[None]).logits[0]
    got = ours(ids, meta)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-3 * scale
    # And the adapter does change the model (a no-op adapter would pass the comparison above too).
    assert (base(ids, meta) - expected).abs().max().item() > 1e-2 * scale


def test_experts_an_adapter_touches_stay_packed_with_quantize(
    checkpoints: dict[str, Path], adapters: dict[str, Path]
) -> None:
    dense = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, lora=adapters["experts"], progress=False
    )
    packed = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, lora=adapters["experts"], quantize=True, progress=False
    )
    assert dense.block[0].mlp.mlp1_weight.dense is not None
    assert packed.block[0].mlp.mlp1_weight.dense is None
    assert packed.block[0].mlp.mlp1_weight.blocks.dtype == torch.uint8
    ids = prompt(32)
    meta = AttentionMetadata.build([len(ids)])
    exact, rounded = dense(ids, meta), packed(ids, meta)
    drift = ((rounded - exact).norm() / exact.norm()).item()
    logger.info("LoRA merged then rounded to MXFP4: relative logit drift %.4f", drift)
    assert 0 < drift < 0.3


def test_bad_adapters_are_named(
    checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    def broken(edit_config: dict | None = None, edit_tensors: object = None) -> Path:
        target = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        config = json.loads((adapters["attention"] / "adapter_config.json").read_text())
        config.update(edit_config or {})
        (target / "adapter_config.json").write_text(json.dumps(config))
        tensors = load_file(str(adapters["attention"] / "adapter_model.safetensors"))
        if callable(edit_tensors):
            edit_tensors(tensors)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        return target

    def load(path: Path) -> GptOss:
        return GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, lora=path, progress=False)

    with pytest.raises(AdapterError, match="rank 8"):
        load(broken({"r": 8}))
    with pytest.raises(AdapterError, match="use_dora"):
        load(broken({"use_dora": True}))

    def drop_a(tensors: dict) -> None:
        del tensors[next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))]

    with pytest.raises(AdapterError, match="lora_A and lora_B"):
        load(broken(edit_tensors=drop_a))

    def other_model(tensors: dict) -> None:
        tensors["base_model.model.model.layers.0.self_attn.qkv_fused.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.model.layers.0.self_attn.qkv_fused.lora_B.weight"] = torch.zeros(64, 4)

    with pytest.raises(AdapterError, match="qkv_fused: adapting this module is not supported"):
        load(broken(edit_tensors=other_model))

    def drop_v(tensors: dict) -> None:
        for key in [k for k in tensors if ".v_proj." in k]:
            del tensors[key]

    with pytest.raises(AdapterError, match=r"target_modules names 'v_proj', but .* holds no v_proj weights"):
        load(broken(edit_tensors=drop_v))
    with pytest.raises(AdapterError, match="holds no LoRA weights"):
        load(broken(edit_tensors=lambda tensors: tensors.clear()))

    def poisoned(tensors: dict) -> None:
        key = next(k for k in tensors if k.endswith("o_proj.lora_B.weight"))
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")

    with pytest.raises(AdapterError, match="o_proj: lora_A or lora_B holds inf or NaN"):
        load(broken(edit_tensors=poisoned))
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        load(tmp_path / "missing")


def test_the_batched_lora_delta_equals_the_per_row_loop() -> None:
    generator = torch.Generator().manual_seed(5)
    slots, width, inp, out = 3, 6, 24, 40
    a = torch.randn(slots, width, inp, generator=generator)
    b = torch.randn(out, slots, width, generator=generator)
    x = torch.randn(9, inp, generator=generator)
    rows = torch.tensor([0, 1, 2, 3, 0, 3, 3, 1, 0])
    column_slot = torch.arange(1, slots + 1).repeat_interleave(width)
    got = lora_delta(x, a, b, column_slot, rows)
    expected = lora_delta_reference(x, a, b, rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got[[0, 4, 8]].abs().max() == 0  # slot 0: no adapter, no update
    # A slot whose product overflows leaves the other slots' rows alone (masked out, not multiplied by 0).
    a[2] = 1e38  # slot 3
    spoiled = lora_delta(x, a, b, column_slot, rows)
    keep = rows != 3
    torch.testing.assert_close(spoiled[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_per_request_adapters_in_one_batch_give_each_row_its_merged_model(
    checkpoints: dict[str, Path], adapters: dict[str, Path]
) -> None:
    """Base, and two adapters of different ranks and modules, in one forward (adapters unmerged in slots 2
    and 1): every sequence's logits are those of the model with its adapter merged."""
    served = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    served.enable_lora(max_loras=2, max_rank=8)
    served.set_lora(2, read_adapter(adapters["attention"], served.config))
    served.set_lora(1, read_adapter(adapters["attention_qv"], served.config))
    references = [
        served,
        GptOss.from_checkpoint(
            checkpoints["hf"], dtype=torch.float32, lora=adapters["attention"], progress=False
        ),
        GptOss.from_checkpoint(
            checkpoints["hf"], dtype=torch.float32, lora=adapters["attention_qv"], progress=False
        ),
    ]
    ids = [prompt(40, 21), prompt(41, 13), prompt(42, 17)]
    slots = [0, 2, 1]
    meta = AttentionMetadata.build([len(i) for i in ids])
    per_token = torch.cat([torch.full((len(i),), s) for i, s in zip(ids, slots, strict=True)])
    batched = served(torch.cat(ids), meta, lora=per_token).split([len(i) for i in ids])
    for seq, reference, got in zip(ids, references, batched, strict=True):
        expected = reference(seq, AttentionMetadata.build([len(seq)]))
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-4 * scale
    # The adapters do change the rows they serve.
    assert (batched[1] - served(ids[1], AttentionMetadata.build([len(ids[1])]))).abs().max() > 1e-3


def test_per_request_adapters_refuse_what_the_stacks_cannot_hold(
    checkpoints: dict[str, Path], adapters: dict[str, Path]
) -> None:
    served = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    served.enable_lora(max_loras=1, max_rank=4)
    with pytest.raises(AdapterError, match="no room for adapters on the experts"):
        served.set_lora(1, read_adapter(adapters["experts"], served.config))
    with pytest.raises(AdapterError, match="rank 8 is above the largest served, 4"):
        served.set_lora(1, read_adapter(adapters["attention_qv"], served.config))
    roomy = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    roomy.enable_lora(max_loras=1, max_rank=2, experts=True)
    with pytest.raises(AdapterError, match="rank 4 is above the largest served, 2"):
        roomy.set_lora(1, read_adapter(adapters["experts"], roomy.config))


def test_stacks_too_large_for_memory_are_refused_before_allocating(checkpoints: dict[str, Path]) -> None:
    served = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    with pytest.raises(ValueError, match="lower --max-loras or --max-lora-rank"):
        served.enable_lora(max_loras=100_000, max_rank=100_000, experts=True)
    assert served.block[0].attn.qkv_lora is None


def test_the_experts_batched_lora_delta_equals_the_per_pair_loop() -> None:
    """:func:`lora_delta` with a leading expert axis (the batched experts' use) and expert by expert (the
    grouped experts') against the per-(token, expert) twin."""
    generator = torch.Generator().manual_seed(6)
    experts, slots, rank, inp, out, width = 5, 3, 4, 24, 40, 7
    a = torch.randn(experts, slots, rank, inp, generator=generator)
    b = torch.randn(experts, out, slots, rank, generator=generator)
    column_slot = torch.arange(1, slots + 1).repeat_interleave(rank)
    ids = torch.tensor([4, 0, 2])
    x = torch.randn(len(ids), width, inp, generator=generator)
    rows = torch.randint(0, slots + 1, (len(ids), width), generator=generator)
    batched = lora_delta(x, a[ids], b[ids], column_slot, rows)
    pair_experts = ids[:, None].expand(-1, width).flatten()
    expected = expert_lora_delta_reference(x.flatten(0, 1), a, b, pair_experts, rows.flatten())
    torch.testing.assert_close(batched.flatten(0, 1), expected, rtol=1e-5, atol=1e-5)
    stack = ExpertLoraStack(experts, slots, rank, inp, out, dtype=torch.float32)
    stack.a.copy_(a)
    stack.b.copy_(b)
    torch.testing.assert_close(stack.delta(ids, x, rows), batched)
    start = torch.randn(width, out, generator=generator)
    added = start.clone()  # expert 0's rows (ids[1]), added in place as the grouped experts do
    stack.add_delta(added, 0, x[1], rows[1][:, None] != stack.column_slot)
    torch.testing.assert_close(added, start + expected[width : 2 * width], rtol=1e-5, atol=1e-5)
    assert expected[rows.flatten() == 0].abs().max() == 0


@pytest.fixture(scope="module")
def peft_logits(checkpoints: dict[str, Path], adapters: dict[str, Path]) -> dict[str, torch.Tensor]:
    """transformers + peft's logits of the prompt `prompt(33)` for each adapter, and for the base (None)."""
    ids = prompt(33)
    out = {"base": _base(checkpoints["hf"])(input_ids=ids[None]).logits[0]}
    for name in adapters:
        peft_model = PeftModel.from_pretrained(_base(checkpoints["hf"]), str(adapters[name])).eval()
        out[name] = peft_model(input_ids=ids[None]).logits[0]
    return out


@pytest.mark.parametrize("expert_mode", ["packed", "dequantized"])
@pytest.mark.parametrize("experts", ["cpu", "batched"])
def test_per_request_expert_adapters_give_peft_s_logits(
    checkpoints: dict[str, Path],
    adapters: dict[str, Path],
    peft_logits: dict[str, torch.Tensor],
    expert_mode: str,
    experts: str,
) -> None:
    """Unmerged adapters on the experts (alone, and with attention and rsLoRA), each in its slot, every token
    on it: PEFT's logits, on packed experts (the CPU's fused kernel where it builds) and dense ones, through
    the CPU's grouped path and the GPU's batched one."""
    served = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, expert_mode=expert_mode, progress=False
    )
    if experts == "batched":
        served.use_kernels(Kernels(served.block[0].attn.attention, experts_batched))
    served.enable_lora(max_loras=2, max_rank=4, experts=True)
    served.set_lora(1, read_adapter(adapters["experts"], served.config))
    served.set_lora(2, read_adapter(adapters["everything"], served.config))
    ids = prompt(33)
    meta = AttentionMetadata.build([len(ids)])
    for slot, name in ((1, "experts"), (2, "everything")):
        got = served(ids, meta, lora=torch.full((len(ids),), slot))
        expected = peft_logits[name]
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-3 * scale, name
        assert (peft_logits["base"] - expected).abs().max().item() > 1e-2 * scale


def test_base_attention_and_expert_adapters_in_one_batch_each_give_peft_s_logits(
    checkpoints: dict[str, Path], adapters: dict[str, Path], peft_logits: dict[str, torch.Tensor]
) -> None:
    """One forward of four sequences: the base, an attention adapter, an experts adapter and one on both, so
    experts see rows of every kind at once: each sequence's logits are PEFT's for its adapter alone."""
    served = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    served.enable_lora(max_loras=3, max_rank=4, experts=True)
    for slot, name in ((1, "attention"), (2, "experts"), (3, "everything")):
        served.set_lora(slot, read_adapter(adapters[name], served.config))
    ids = prompt(33)
    names = ["base", "experts", "attention", "everything"]
    slots = [0, 2, 1, 3]
    meta = AttentionMetadata.build([len(ids)] * len(names))
    per_token = torch.cat([torch.full((len(ids),), s) for s in slots])
    batched = served(ids.repeat(len(names)), meta, lora=per_token).split(len(ids))
    for name, got in zip(names, batched, strict=True):
        expected = peft_logits[name]
        assert (got - expected).abs().max().item() <= 1e-3 * expected.abs().max().item(), name
