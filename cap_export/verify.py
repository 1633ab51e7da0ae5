"""Measure an export against the adapter as trained: max |Δlogit| and mean KL on sample text.

  trained   cap's own forward (common.models: the pipeline layers, with the Control Adapter where
            training put it: the block delta or every residual writer), class c on every token:
            c = +1, or −1 for an --inverse / --exact-inverse export; spectral Q as stored
  exported  transformers' model with the PEFT LoRA loaded (PeftModel.from_pretrained), or a merged
            model folder; a multiplicative LoRA is merged into a temporary folder first
Both run in float32 on the CPU by default. KL is KL(trained ‖ exported) per position, averaged.
Non-finite logits (either side) or KL are reported as problems: NaN is never taken for agreement.
An export whose tensors do not fit BASE is refused from the shapes alone (`check_export`), before
any model is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from cap_common.adapters.io import CONFIG_NAME
from cap_common.dtypes import torch_dtype
from cap_common.errors import CapError
from cap_common.models.loading import INDEX, SINGLE
from cap_export.adapters import Control, load_lora
from cap_export.base import Base
from cap_export.compat import check_lora_family, check_lora_modules, check_lora_shapes, check_model_shapes
from cap_export.folders import PROVENANCE, read_provenance

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog while the river runs bright under the morning light.",
    "Control adapters change how a language model writes: its tone, its style and what it avoids saying.",
    "In 1969 two astronauts walked on the Moon; the rest of the crew waited in orbit for their return.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Dear team, thank you for the careful review. I will send the revised draft before Friday.",
)


@dataclass
class Report:
    max_abs: float  # max |logit_trained − logit_exported| over all positions and tokens
    mean_kl: float  # mean over positions of KL(trained ‖ exported)
    effect: float  # max |logit_trained − logit_base|: how much the adapter moves the logits
    tokens: int
    problems: tuple[str, ...] = ()  # which logits, or the KL, are not finite


def trained_model(base_dir: Path, control: Control, dtype: torch.dtype, c: int):
    """logits(input_ids [B,T], adapted) of cap's forward: the base model with `control` applied to
    every position as class c (+1 or −1), or, not adapted, as class 0 (the base model itself).

    A spectral adapter runs with Q as stored, as it was trained and as it is exported (qlora-pipe-lite
    trains Q itself; cap trains orth(Q) and saves that, so the two agree for cap's adapters):
    W'_c = Q·diag(e^(c·S) − 1)·Qᵀ = U·V (Control.factors), held by a 'full' adapter with s = 1,
    B = c·U, A = V, whose class-c forward adds c·s·B·A = U·V. cap's spectral ControlAdapter would use
    orth(Q), the reduced QR of Q, instead."""
    from cap_common.models.layers import DecoderLayerPipe
    from cap_common.models.loading import open_model
    from cap_common.models.pipeline import StageBuilder
    from cap_common.models.spec import ModelSpec

    source = open_model(base_dir)
    if dtype == torch.float64 and source.family.experts:
        source.config._experts_implementation = "eager"  # grouped_mm has no float64
    spectral = control.adapter_type == "spectral"
    states = control.states
    if spectral:
        factors = {layer: control.factors(layer, "forward" if c > 0 else "inverse") for layer in control.layers}
        states = {layer: {"A": V, "B": c * U} for layer, (U, V) in factors.items()}
    spec = ModelSpec.control_adapter(
        base_dir,
        dtype,
        source=control.folder,
        rank=control.rank,
        alpha=control.rank if spectral else control.alpha,
        adapter_type="full" if spectral else control.adapter_type,
        target=control.target,
        layers=control.layers,
    )
    builder = StageBuilder(spec, "cpu", source=source)
    modules = [builder.build(p) for p in range(builder.num_layers + 2)]
    for module in modules:
        if isinstance(module, DecoderLayerPipe) and module.adapter is not None:
            module.adapter.load_state(states[module.index])
    for module in modules:
        module.eval()
    embed, layers, head = modules[0], modules[1:-1], modules[-1]

    @torch.no_grad()
    def logits(input_ids: torch.Tensor, adapted: bool) -> torch.Tensor:
        hidden, position_ids, _, labels = embed((input_ids, torch.zeros_like(input_ids, dtype=torch.int8)))
        x = (hidden, position_ids, torch.full_like(input_ids, c if adapted else 0, dtype=torch.int8), labels)
        for layer in layers:
            x = layer(x)
        return head(x).float()

    return logits


def check_export(base: Base, exported: Path) -> None:
    """EXPORTED fits BASE, by the shapes alone (no model is built): a LoRA folder's pairs fit the
    weights they change (additive, or multiplicative when marked), a merged model folder has BASE's
    tensors with BASE's shapes (when it is in safetensors, as merge writes it)."""
    if not is_lora(exported):
        if any((Path(exported) / name).is_file() for name in (SINGLE, INDEX)):
            check_model_shapes(Base(exported), base)
        return
    lora = load_lora(exported)
    check_lora_family(lora, base)
    if lora.marked_multiplicative:
        check_lora_modules(lora, base)
    instead = "merge it with `cap-export merge BASE LORA OUT --multiplicative` and verify that folder"
    check_lora_shapes(lora, base, lora.marked_multiplicative, instead)


def is_lora(exported: Path) -> bool:
    """Whether EXPORTED is a LoRA folder (adapter_config.json) rather than a model folder (config.json)."""
    exported = Path(exported)
    if (exported / CONFIG_NAME).is_file():
        return True
    if (exported / "config.json").is_file():
        return False
    raise CapError(f"{exported}: neither a LoRA folder ({CONFIG_NAME}) nor a model folder (config.json)")


def _auto_class(base: Base):
    """transformers' class for BASE's checkpoints: a causal LM, or for a multimodal model (whose text
    model cap trains) the image-text-to-text model, called here with text alone."""
    import transformers

    multimodal = base.checkpoint is not None and base.checkpoint.text_prefix
    return transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM


def exported_model(base: Base, exported: Path, dtype: torch.dtype, tmp: Path):
    """logits(input_ids) of the export: a PEFT LoRA folder (additive, or multiplicative via a
    temporary merge) or a merged model folder. Returns (logits, kind, provenance)."""

    attn = {"attn_implementation": base.family.attention}
    if is_lora(exported):
        lora = load_lora(exported)
        if lora.marked_multiplicative:
            from cap_export.merge import merge

            merged = tmp / "merged"
            merged.mkdir()
            merge(base, lora, merged, multiplicative=True, progress=False)
            model = _auto_class(base).from_pretrained(merged, dtype=dtype, **attn)
            kind = "multiplicative LoRA (merged for the check)"
        else:
            try:
                import peft
            except ImportError:
                raise CapError(
                    "verifying a LoRA folder needs PEFT (pip install peft); or verify a merged folder"
                ) from None
            model = _auto_class(base).from_pretrained(base.folder, dtype=dtype, **attn)
            model = peft.PeftModel.from_pretrained(model, exported)
            kind = "additive LoRA (PEFT)"
        record = lora.provenance
    else:
        model = _auto_class(base).from_pretrained(exported, dtype=dtype, **attn)
        kind, record = "merged model", read_provenance(exported)
    model.eval()
    if dtype == torch.float64 and base.family.experts:
        model.config._experts_implementation = "eager"  # grouped_mm has no float64

    @torch.no_grad()
    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids).logits.float()

    return logits, kind, record


def stored_dtype(exported: Path) -> str | None:
    """The weight dtype a merged model folder declares in its config.json (None for a LoRA folder)."""
    import json

    exported = Path(exported)
    if (exported / CONFIG_NAME).is_file() or not (exported / "config.json").is_file():
        return None
    try:
        config = json.loads((exported / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def sample_ids(base_dir: Path, texts: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Each text tokenized with the base model's tokenizer, cut to max_tokens: [1, T] each."""
    import transformers

    if max_tokens < 1:
        raise CapError(f"--max-tokens {max_tokens}: must be at least 1")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as e:
        raise CapError(f"{base_dir}: cannot load its tokenizer ({e}); verify tokenizes sample text with it") from None
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
        if ids.shape[1]:
            out.append(ids)
    if not out:
        raise CapError("no sample text to run (the text is empty)")
    return out


def _max(a: float, b: float) -> float:
    """max that keeps NaN (Python's max(0.0, nan) is 0.0)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def compare(trained, exported, batches: list[torch.Tensor]) -> Report:
    max_abs, effect, kl_sum, n = 0.0, 0.0, 0.0, 0
    problems = {}
    for ids in batches:
        want = trained(ids, True)
        got = exported(ids)
        plain = trained(ids, False)
        for side, logits in (
            ("trained model (the adapter as trained)", want),
            ("exported model", got),
            ("base model", plain),
        ):
            if not bool(torch.isfinite(logits).all()):
                problems[side] = f"the {side}'s logits are not finite (NaN or Inf)"
        max_abs = _max(max_abs, float((want - got).abs().max()))
        effect = _max(effect, float((want - plain).abs().max()))
        log_p = torch.log_softmax(want.double(), -1)
        log_q = torch.log_softmax(got.double(), -1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).sum())
        n += ids.numel()
    if not problems and not math.isfinite(kl_sum):
        problems["kl"] = (
            "the KL(trained ‖ exported) is not finite (the export gives probability 0 where training does not)"
        )
    return Report(max_abs, kl_sum / n, effect, n, tuple(problems.values()))


def resolve(adapter: Path, exported: Path | None) -> tuple[Path, Path | None]:
    """(control adapter, export or None): ADAPTER may itself be an export that records its source."""
    adapter = Path(adapter)
    record = read_provenance(adapter)
    if exported is None and record.get("source") and record.get("kind") in ("additive", "multiplicative", "merged"):
        return Path(record["source"]), adapter
    if exported is None and record.get("kind"):
        raise CapError(
            f"{adapter}/{PROVENANCE}: does not record the Control Adapter it was made from; "
            f"pass the adapter and the export: verify BASE CKPT EXPORTED"
        )
    return adapter, exported


def run_verify(
    base: Base,
    control: Control,
    exported: Path,
    direction: str,
    texts: list[str],
    scratch: Path,
    max_tokens: int = 128,
    dtype: str = "float32",
) -> tuple[Report, str]:
    """Compare on `texts`; a multiplicative LoRA is merged into `scratch`, a temporary folder the caller removes."""
    run_dtype = torch_dtype(dtype)
    batches = sample_ids(base.folder, texts, max_tokens)
    trained = trained_model(base.folder, control, run_dtype, -1 if direction in ("inverse", "negate") else +1)
    logits, kind, _ = exported_model(base, exported, run_dtype, Path(scratch))
    return compare(trained, logits, batches), kind
