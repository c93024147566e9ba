"""LoRA adapters in PEFT's format, merged into the model's weights at load.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. PEFT names each pair
``base_model.model.model.layers.N.<module>.lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``,
and the update of the module's ``[out, in]`` weight is ``scaling · B @ A`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). The attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``)
are plain modules. The experts are targeted as parameters (PEFT's ``target_parameters``:
``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` and ``down_proj`` ``[E, I, H]``), one pair for all experts: A is
``[E·r, in]`` with expert e's rows ``e·r ..``, B is ``[out, r·E]`` with rank j of expert e in column
``j·E + e``; when both parameters are targeted PEFT nests the wrappers (``experts.base_layer.lora_*`` is one,
``experts.lora_*`` the other), which are told apart here by their shapes.

:func:`read_adapter` returns the updates by the model's own parameter names and orientation (``[out, in]``,
the q, k and v rows of the fused ``qkv``), and :meth:`model.gpt_oss.GptOss.merge_lora` adds them.

**Per-request adapters.** Unmerged, the adapters of several requests run in one batch: each adapted
projection keeps every loaded adapter's pair in one :class:`LoraStack` (slot 0 is "no adapter" and holds
nothing), and a forward takes each token's slot. :func:`lora_delta` computes all rows' updates with two
dense matmuls whatever the mix of slots; :func:`lora_delta_reference`, a per-row loop, is its twin in the
tests.

The experts' parameters are adapted the same way, expert by expert (:class:`ExpertLoraStack`: every slot's
pair for each expert). PEFT adds its update to the parameter itself (``W + scaling · B_e A_e`` for expert
`e`, bias untouched), so a token routed to `e` gets ``scaling · B_e A_e x`` added to that expert's matmul
output: ``mlp1``'s before the clamped SwiGLU (its rows interleave gate and up as the weight's do), ``mlp2``'s
before the routing weight. The MoE implementations (:mod:`model.kernels.experts`) add
:func:`lora_delta` of each expert's rows next to that expert's matmul, outside any kernel;
:func:`expert_lora_delta_reference` is the per-(token, expert) twin.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import ModelConfig


class AdapterError(ValueError):
    """An adapter this model cannot take; the message names the file, tensor or setting at fault."""


@dataclass(frozen=True, slots=True)
class Update:
    """`scaling · B @ A` for the rows `rows` of the parameter `name` (all rows when None); for experts,
    `a [E, r, in]`, `b [E, out, r]`."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    rows: slice | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[-2]

    @property
    def on_experts(self) -> bool:
        return self.a.dim() == 3

    def delta(self) -> torch.Tensor:
        """The dense update, `[out, in]` (or `[E, out, in]`), in float32."""
        return (self.b.float() @ self.a.float()) * self.scaling


_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
_PLAIN = {"self_attn.o_proj": "attn.out.weight"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_EXPERTS = ("mlp.experts", "mlp.experts.base_layer")


def read_adapter(path: str | Path, config: ModelConfig) -> list[Update]:
    """The updates an adapter directory makes to a model of `config`, checked against its shapes."""
    root = Path(path)
    try:
        settings = json.loads((root / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{root / 'adapter_config.json'}: {error}") from error
    if not isinstance(settings, dict):
        raise AdapterError(f"{root / 'adapter_config.json'}: not a JSON object")
    if settings.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type: only LORA adapters are supported, got {settings['peft_type']!r}")
    for unsupported in ("use_dora", "lora_bias"):
        if settings.get(unsupported):
            raise AdapterError(f"{unsupported}: not supported")
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise AdapterError("rank_pattern / alpha_pattern: per-module ranks are not supported")
    try:
        rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterError(
            f"{root / 'adapter_config.json'}: r and lora_alpha must be numbers ({error!r})"
        ) from None
    if rank < 1:
        raise AdapterError(f"{root / 'adapter_config.json'}: r must be positive, got {rank}")
    scaling = alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)
    try:
        tensors = load_file(str(root / "adapter_model.safetensors"))
    except (OSError, ValueError, SafetensorError) as error:
        raise AdapterError(f"{root / 'adapter_model.safetensors'}: {error}") from error
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{key}: not a LoRA weight of a gpt-oss layer")
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= config.num_hidden_layers:
            raise AdapterError(f"{key}: layer {layer}, but the model has {config.num_hidden_layers}")
        pairs.setdefault((layer, module), {})[side] = tensor
    if not pairs:
        raise AdapterError(f"{root / 'adapter_model.safetensors'}: holds no LoRA weights")
    updates, targeted = [], set()
    for (layer, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must be floating point")
        # A served adapter's weights meet every row of the batch in the stacked products (masked to zero for
        # rows of other adapters, and 0 · inf is NaN): a non-finite one would spoil other requests.
        if not (a.float().isfinite().all() and (b.float() * scaling).isfinite().all()):
            raise AdapterError(f"layer {layer} {module}: lora_A or lora_B holds inf or NaN")
        update = _update(config, layer, module, a, b, rank, scaling)
        updates.append(update)
        if update.on_experts:
            targeted.add("gate_up_proj" if update.name.endswith("mlp1_weight") else "down_proj")
        else:
            targeted.add(module.rsplit(".", 1)[-1])
    _check_targets(settings, targeted, root)
    return updates


# What adapter_config.json may target that this model serves (its other names are refused by their weights).
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")


def _check_targets(settings: dict, targeted: set[str], root: Path) -> None:
    """Refuse an adapter whose config names a target (`target_modules`, `target_parameters`, when lists)
    that none of its weights adapt (`targeted`): tensors went missing from the file."""
    for field in ("target_modules", "target_parameters"):
        targets = settings.get(field)
        if not isinstance(targets, list):
            continue  # a regular expression, "all-linear" or absent: nothing to hold the weights to
        for target in targets:
            leaf = str(target).rsplit(".", 1)[-1]
            if leaf in _TARGETS and leaf not in targeted:
                raise AdapterError(
                    f"{root / 'adapter_config.json'}: {field} names {target!r}, but "
                    f"adapter_model.safetensors holds no {leaf} weights"
                )


def _update(
    config: ModelConfig, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, rank: int, scaling: float
) -> Update:
    prefix = f"block.{layer}."
    where = f"layer {layer} {module}"
    h, e, i = config.hidden_size, config.num_experts, config.intermediate_size
    if module in _EXPERTS:
        # gate_up_proj maps H to 2I, down_proj I to H: the shapes say which parameter a pair adapts.
        shapes = {(e * rank, h, 2 * i): "mlp.mlp1_weight", (e * rank, i, h): "mlp.mlp2_weight"}
        name = shapes.get((a.shape[0], a.shape[1], b.shape[0]))
        if name is None or b.shape[1] != rank * e:
            raise AdapterError(
                f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} fit neither gate_up_proj nor "
                f"down_proj with rank {rank} and {e} experts"
            )
        experts_a = a.reshape(e, rank, a.shape[1])  # [E, r, in]
        experts_b = b.reshape(b.shape[0], rank, e).permute(2, 0, 1)  # [E, out, r]
        return Update(prefix + name, experts_a, experts_b, scaling)
    if module in _QKV:
        index = _QKV.index(module)
        sizes = (config.q_size, config.kv_size, config.kv_size)
        start = sum(sizes[:index])
        expected = (sizes[index], h)
        rows: slice | None = slice(start, start + sizes[index])
        name = prefix + "attn.qkv.weight"
    elif module in _PLAIN:
        name = prefix + _PLAIN[module]
        expected = (h, config.q_size)
        rows = None
    else:
        raise AdapterError(f"{where}: adapting this module is not supported")
    if a.shape != (rank, expected[1]) or b.shape != (expected[0], rank):
        raise AdapterError(
            f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)}, expected {[rank, expected[1]]} and "
            f"{[expected[0], rank]} (rank {rank})"
        )
    return Update(name, a, b, scaling, rows)


def part_rows(config: ModelConfig, name: str) -> list[slice]:
    """The row ranges of the parameter `name` that adapters update separately (q, k and v in ``qkv``)."""
    if name.endswith("attn.qkv.weight"):
        q, kv = config.q_size, config.kv_size
        return [slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)]
    return [slice(0, config.hidden_size)]


def check_unmerged(updates: list[Update], max_rank: int, experts: bool) -> None:
    """Refuse an adapter that per-request serving cannot apply: one of a rank above `max_rank` (the stacks'
    width), or one on the experts where the model keeps no room for them (`experts` False)."""
    for update in updates:
        if update.on_experts and not experts:
            raise AdapterError(
                f"{update.name.rsplit('.', 1)[0]}: the adapter targets the experts (gate_up_proj / "
                "down_proj), and this server keeps no room for adapters on the experts (start it with "
                "--lora-experts true, or merge the adapter with --merge-lora)"
            )
        if update.rank > max_rank:
            raise AdapterError(
                f"rank {update.rank} is above the largest served, {max_rank} (--max-lora-rank)"
            )


class LoraStack(nn.Module):
    """The adapters of one projection, every loaded one side by side: `a [S, R, in]` and `b [out, S, R]`
    (the scaling folded into `b`), stored slot `s` at index ``s - 1``. `R` is the largest rank times the
    parts the projection's rows are cut into (``qkv``: q, k and v each get `max_rank` columns, so their
    updates never mix); a smaller rank leaves zero columns, which add nothing."""

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        in_features: int,
        parts: list[slice],
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.max_rank = max_rank
        self.parts = parts
        width = max_rank * len(parts)
        out_features = parts[-1].stop
        self.register_buffer(
            "a", torch.zeros(num_slots, width, in_features, dtype=dtype, device=device), False
        )
        self.register_buffer(
            "b", torch.zeros(out_features, num_slots, width, dtype=dtype, device=device), False
        )
        # The slot each column of the flattened `[S·R]` rank axis belongs to.
        slots = torch.arange(1, num_slots + 1, device=device).repeat_interleave(width)
        self.register_buffer("column_slot", slots, False)

    def clear(self, slot: int) -> None:
        self.a[slot - 1].zero_()
        self.b[:, slot - 1].zero_()

    def install(self, slot: int, update: Update) -> None:
        """Put one update (a part's pair) into `slot`'s columns."""
        rows = update.rows or slice(0, self.b.shape[0])
        part = self.parts.index(rows)
        rank = update.a.shape[0]
        assert rank <= self.max_rank, "checked by check_unmerged"
        columns = slice(part * self.max_rank, part * self.max_rank + rank)
        self.a[slot - 1, columns] = update.a.to(self.a)
        self.b[rows, slot - 1, columns] = (update.b.float() * update.scaling).to(self.b)

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return lora_delta(x, self.a, self.b, self.column_slot, slots)


class ExpertLoraStack(nn.Module):
    """The adapters of one experts parameter (``mlp1`` or ``mlp2`` of a block), every loaded one side by
    side for each expert: `a [E, S, R, in]` and `b [E, out, S, R]` (the scaling folded into `b`), slot `s`
    at index ``s - 1``, so that expert `e`'s pair ``(a[e], b[e])`` is a :class:`LoraStack`'s. `filled` (on
    the host) names the slots holding an update here, so the experts skip a block no row adapts."""

    def __init__(
        self,
        num_experts: int,
        num_slots: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.max_rank = max_rank
        self.filled: set[int] = set()
        shape_a = (num_experts, num_slots, max_rank, in_features)
        shape_b = (num_experts, out_features, num_slots, max_rank)
        self.register_buffer("a", torch.zeros(shape_a, dtype=dtype, device=device), False)
        self.register_buffer("b", torch.zeros(shape_b, dtype=dtype, device=device), False)
        slots = torch.arange(1, num_slots + 1, device=device).repeat_interleave(max_rank)
        self.register_buffer("column_slot", slots, False)

    def clear(self, slot: int) -> None:
        self.a[:, slot - 1].zero_()
        self.b[:, :, slot - 1].zero_()
        self.filled.discard(slot)

    def install(self, slot: int, update: Update) -> None:
        """Put an experts update (`a [E, r, in]`, `b [E, out, r]`) into `slot`."""
        rank = update.rank
        assert rank <= self.max_rank, "checked by check_unmerged"
        self.a[:, slot - 1, :rank] = update.a.to(self.a)
        self.b[:, :, slot - 1, :rank] = (update.b.float() * update.scaling).to(self.b)
        self.filled.add(slot)

    def delta(self, experts: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The updates of the rows `x [C, W, in]` of `C` experts (their ids), each row on its slot
        (`slots [C, W]`; padding rows take slot 0): :func:`lora_delta` in two batched matmuls."""
        return lora_delta(x, self.a[experts], self.b[experts], self.column_slot, slots)

    def add_delta(self, out: torch.Tensor, expert: int, x: torch.Tensor, other: torch.Tensor) -> None:
        """Add the updates of one expert's rows `x [P, in]` to `out [P, out]` in place: :func:`lora_delta`
        in three ops, for a caller that loops over experts (the CPU's) and so pays per op. `other [P, S·R]`
        is True where a column belongs to another slot than the row's (``slots[:, None] !=
        column_slot``), computed once for all of a step's pairs."""
        shrunk = x @ self.a[expert].flatten(0, 1).T
        shrunk.masked_fill_(other, 0)  # a fill, not a product: an overflow in another slot stays out
        out.addmm_(shrunk, self.b[expert].flatten(1, 2).T)


def lora_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, column_slot: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Every row's low-rank update `[T, out]` at once: `x [T, in]` through all adapters' A (one matmul to
    `[T, S·R]`), each row's columns of other slots zeroed (a row of slot 0 keeps none), then all B (one
    matmul). With leading batch dimensions (`x [C, T, in]`, `a [C, S, R, in]`, `b [C, out, S, R]`,
    `slots [C, T]`) the same for each of `C` pairs of stacks, in two batched matmuls (the experts').

    Two dense products of static shape, with no gather and no grouping by slot, so a batch of any mix costs
    the same; the waste (every row goes through every slot's A) is `S·R` columns, small beside the
    projection's own `out`."""
    shrunk = x @ a.flatten(-3, -2).mT
    # `where`, not a product with the mask: another slot's column that overflowed stays out (0 · inf is NaN).
    shrunk = torch.where(slots[..., None] == column_slot, shrunk, 0)
    return shrunk @ b.flatten(-2, -1).mT


def lora_delta_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """The twin of :func:`lora_delta`: row by row, its own slot's ``B @ (A @ x)`` (nothing for slot 0)."""
    out = torch.zeros(x.shape[0], b.shape[0], dtype=x.dtype, device=x.device)
    for row, slot in enumerate(slots.tolist()):
        if slot:
            out[row] = b[:, slot - 1] @ (a[slot - 1] @ x[row])
    return out


def expert_lora_delta_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """The twin of the experts' use of :func:`lora_delta`: pair by pair (`x [P, in]`, each pair's expert and
    slot), ``B_e @ (A_e @ x)`` of its own slot's adapter (nothing for slot 0), from an
    :class:`ExpertLoraStack`'s `a` and `b`."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for row, (expert, slot) in enumerate(zip(experts.tolist(), slots.tolist(), strict=True)):
        if slot:
            out[row] = b[expert, :, slot - 1] @ (a[expert, slot - 1] @ x[row])
    return out


def write_random_adapter(
    config: ModelConfig,
    directory: str | Path,
    *,
    rank: int,
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    experts: tuple[str, ...] = (),
    alpha: float = 16.0,
    seed: int = 0,
) -> Path:
    """A random adapter for a model of `config`, in PEFT's format, for tests and benchmarks (PEFT itself
    starts B at zero, a no-op; these change the model): on the attention `modules`, and on the experts'
    parameters named in `experts` (``gate_up_proj``, ``down_proj``), laid out as PEFT's ``target_parameters``
    saves them (A ``[E·r, in]``, B ``[out, r·E]``; the first of two nested wrappers under ``base_layer``)."""
    generator = torch.Generator().manual_seed(seed)
    h, q, kv, i, e = (
        config.hidden_size,
        config.q_size,
        config.kv_size,
        config.intermediate_size,
        config.num_experts,
    )
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    expert_shapes = {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}
    tensors = {}

    def pair(key: str, out: int, inp: int, width: int) -> None:
        tensors[f"{key}.lora_A.weight"] = torch.randn(width, inp, generator=generator) / math.sqrt(inp)
        tensors[f"{key}.lora_B.weight"] = torch.randn(out, width, generator=generator) * 0.1

    for layer in range(config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}"
        for module in modules:
            pair(f"{prefix}.self_attn.{module}", *shapes[module], rank)
        for n, parameter in enumerate(experts):
            nested = ".base_layer" if n == 0 and len(experts) == 2 else ""
            pair(f"{prefix}.mlp.experts{nested}", *expert_shapes[parameter], rank * e)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    settings = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(modules),
        "target_parameters": [f"mlp.experts.{parameter}" for parameter in experts],
    }
    (root / "adapter_config.json").write_text(json.dumps(settings))
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root
