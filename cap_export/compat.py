"""Which model family an adapter belongs to, and whether it fits the base model it is used with:
the family fallback when no base model is given (`family_without_base`), the shape and family
checks (`check_fits`, `check_lora_family`, `check_lora_shapes`, `check_lora_modules` for a
multiplicative LoRA made without a base model, `check_model_shapes` for a merged model folder), and
the note when a 'block' adapter's export is only an approximation on a family (`approximation_note`).
Every user-facing problem is a one-line CapError naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cap_common.errors import CapError
from cap_common.models.families import Family, check_model_type, family_of
from cap_export.adapters import Control, Lora
from cap_export.base import Base, model_config, writer_keys
from cap_export.folders import PROVENANCE

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def recorded_base(adapter_config: dict) -> Path | None:
    """The base model folder an adapter records (base_model_name_or_path), when it exists here."""
    recorded = adapter_config.get("base_model_name_or_path")
    return Path(recorded) if recorded and (Path(recorded) / "config.json").is_file() else None


def family_without_base(
    control_config: dict, hidden_size: int, mixtral_experts: int | None, cohere: bool
) -> tuple[Family, object, str]:
    """Family and a config for naming the writers when no base model is given: from the adapter's
    base_model_name_or_path if that folder exists, else from --mixtral N / --cohere, else Llama-like
    names (self_attn.o_proj, mlp.down_proj — the same in every non-MoE family). Returns a note too."""
    import transformers

    if mixtral_experts is not None and mixtral_experts < 1:
        raise CapError(f"--mixtral {mixtral_experts}: the number of experts must be at least 1")
    recorded = recorded_base(control_config)
    if recorded:
        family, config = model_config(recorded)
        return family, config, f"family {family.model_type} from {recorded}/config.json"
    if mixtral_experts:
        config = transformers.AutoConfig.for_model(
            "mixtral",
            hidden_size=hidden_size,
            num_local_experts=mixtral_experts,
            num_attention_heads=1,
            num_key_value_heads=1,
        )
        return family_of("mixtral"), config, f"Mixtral naming with {mixtral_experts} experts (--mixtral)"
    model_type = "cohere" if cohere else "llama"
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=hidden_size, num_attention_heads=1, num_key_value_heads=1
    )
    return (
        family_of(model_type),
        config,
        (
            "no base model: writers self_attn.o_proj and mlp.down_proj, for any family that has them; "
            "Mixtral: pass --base or --mixtral N"
        ),
    )


def check_fits(control: Control, base: Base) -> None:
    """The adapter was trained on a model of this shape: hidden size and layer indices."""
    where = control.weights
    if control.hidden_size != base.hidden_size:
        raise CapError(
            f"{where}: hidden size {control.hidden_size}, but {base.folder}/config.json has hidden_size "
            f"{base.hidden_size} (adapter and base model do not match)"
        )
    if max(control.layers) >= base.num_layers:
        raise CapError(
            f"{where}: has layer {max(control.layers)}, but {base.folder}/config.json has "
            f"{base.num_layers} layers (adapter and base model do not match)"
        )
    recorded = recorded_base(control.config)
    if recorded:
        try:
            raw = json.loads((recorded / "config.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            raw = None
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        try:  # the family it trained (a multimodal model's: its text model's)
            model_type = check_model_type(raw).model_type if model_type else None
        except CapError:
            pass
        if model_type and model_type != base.family.model_type:
            raise CapError(
                f"{where}: trained on a {model_type} model ({recorded}), but {base.folder} is {base.family.model_type}"
            )


def check_lora_family(lora: Lora, base: Base) -> None:
    """A LoRA that cap-export made for one model family is not applied to another."""
    made_for = lora.provenance.get("model_type")
    if made_for and made_for != base.family.model_type:
        raise CapError(
            f"{lora.folder}: made for a {made_for} model ({PROVENANCE}), but {base.folder} is {base.family.model_type}"
        )


def check_lora_shapes(lora: Lora, base: Base, multiplicative: bool, instead: str) -> None:
    """Every pair fits the BASE weight M [out, in] it changes: lora_B [out, r] and lora_A [r, in]
    (additive, M + s·B·A) or [r, out] (multiplicative, M + s·B·(A·M)). In an additive use, a pair
    that fits only multiplicatively (qlora-pipe-lite's multiplicative tool writes no marker) is said
    to look multiplicative, followed by `instead`: what to do."""
    for module in sorted(lora.pairs):
        A, B = (list(t.shape) for t in lora.pairs[module])
        name = f"{module}.weight"
        if not base.has(name):
            raise CapError(
                f"{lora.folder}: {module}: {base.folder} ({base.family.model_type}, {base.num_layers} layers, "
                f"hidden_size {base.hidden_size}) has no weight {name}; the LoRA is for another model"
            )
        shape = base.shape(name)
        if len(shape) != 2:
            raise CapError(f"{lora.folder}: {module}: {name} in {base.folder} is {shape}, not a matrix")
        (out, inp), r = shape, A[0]
        want_a = [r, out if multiplicative else inp]
        if A == want_a and B == [out, r]:
            continue
        looks = not multiplicative and A == [r, out] and B == [out, r]
        raise CapError(
            f"{lora.folder}: {module}: lora_A {A} / lora_B {B} do not fit its weight [{out}, {inp}] in "
            f"{base.folder}; expected lora_A {want_a}, lora_B [{out}, {r}]"
            + (f" (it looks multiplicative: {instead})" if looks else "")
        )


def check_model_shapes(model: Base, base: Base) -> None:
    """A merged model folder holds BASE's tensors with BASE's shapes (per-expert and fused checkpoints
    matched through Base.locate; lm_head is left out when BASE ties it to the embeddings)."""
    where, theirs = model.folder, f"{base.folder} ({base.family.model_type}, {base.num_layers} layers)"
    if model.family.model_type != base.family.model_type:
        raise CapError(
            f"{where}/config.json: model_type {model.family.model_type}, but {base.folder} is "
            f"{base.family.model_type}; not a merge of it"
        )
    skip = {"lm_head.weight"} if getattr(base.config, "tie_word_embeddings", False) else set()
    for name in sorted(set(model.files) - skip):
        if not base.has(name):
            raise CapError(f"{where}: has tensor {name} {model.shape(name)}, which {theirs} does not have")
        if model.shape(name) != base.shape(name):
            raise CapError(f"{where}: tensor {name} has shape {model.shape(name)}; {theirs} has {base.shape(name)}")
    for name in sorted(set(base.files) - skip):
        if not model.has(name):
            raise CapError(f"{where}: has no tensor {name} {base.shape(name)}, which {theirs} has")


def check_lora_modules(lora: Lora, base: Base) -> None:
    """A multiplicative LoRA that records its modules and hidden size (cap-export multiplicative, any
    family when made without --base) fits BASE: same hidden size, every module present in every
    adapted layer, and no residual writer of BASE left out (all of Mixtral's experts)."""
    modules, hidden = lora.provenance.get("modules"), lora.provenance.get("hidden_size")
    where = lora.folder / PROVENANCE
    if hidden and hidden != base.hidden_size:
        raise CapError(
            f"{where}: made for hidden size {hidden}, but {base.folder}/config.json has hidden_size "
            f"{base.hidden_size} (LoRA and base model do not match)"
        )
    if not modules:
        return
    mixtral = ""
    if base.family.fused_experts:
        experts = getattr(base.config, "num_local_experts", None) or "N"
        mixtral = f"; for this Mixtral model export with --mixtral {experts} (its expert count) or --base {base.folder}"
    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, lora.pairs) if m})
    for layer in layers:
        for module in modules:
            try:
                base.locate(f"model.layers.{layer}.{module}.weight")
            except CapError:
                raise CapError(
                    f"{where}: this LoRA is for {', '.join(_short(modules))} in layer {layer}, but "
                    f"{base.folder} ({base.family.model_type}, {base.num_layers} layers) has no "
                    f"model.layers.{layer}.{module}{mixtral}"
                ) from None
    left_out = [
        key.removesuffix(".weight") for layer in layers or [0] for key in writer_keys(base.family, base.config, layer)
    ]
    left_out = list(dict.fromkeys(left_out))
    left_out = [key for key in left_out if key not in modules]
    if left_out:
        raise CapError(
            f"{where}: this LoRA is for {', '.join(_short(modules))}, but {base.folder} "
            f"({base.family.model_type}) also writes the residual stream with {', '.join(_short(left_out))}, "
            f"which it would leave unchanged{mixtral}"
        )


def _short(modules: list[str]) -> list[str]:
    """Module names for a message: at most four, then a count."""
    return modules if len(modules) <= 4 else [*modules[:3], f"… ({len(modules)} in all)"]


def approximation_note(target: str, family: Family) -> str | None:
    """Why the writers form of a 'block' adapter is not exact on this family (None when it is)."""
    if target != "block" or family.block == "parallel":
        return None
    why = (
        "the MLP reads the attention output before the block's adapter would transform it"
        if family.block == "sequential"
        else "the writers' outputs pass through post-norms, and the MLP reads the attention output first"
    )
    return (
        f"this adapter was trained on the whole block delta (control_adapter_target 'block'); on a "
        f"{family.model_type} model the exported form is an approximation ({why}). "
        f"`cap-export verify` measures the gap"
    )
