"""The one TOML config that drives cap-prep, cap-train and cap-export.

`load_config(path)` parses and validates everything up front and returns a frozen `Config`.
Every key of qlora-pipe-lite's README is here with the same default and meaning, plus cap's own
(marked "cap:" in the help); every key either generation of qlora-pipe-lite reads (Aug 2025 and
Oct 2025) is accepted, with its meaning there, or with a note when it cannot mean anything in cap.
Each key is declared once, with its parser and help text; the README's config reference is
generated from these declarations (`python -m cap_common.config --reference`).
A relative path names what exists next to the config, else what exists under the working directory
(qlora-pipe-lite's base), else the place next to the config (`resolve_path`).
A config of qlora-pipe-lite's Oct-2025 generation gets that generation's defaults (`_generation_defaults`).
Over 300 lines because every key is declared here, each with its default, parser and help.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomllib

from cap_common.errors import CapError

REQUIRED = object()


class Invalid(ValueError):
    """Raised by a parser with the text 'what is allowed'."""


# ---------------------------------------------------------------- value parsers
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo: int | None = None) -> Callable[[Any], int]:
    def parse(v):
        if not _is_int(v) or (lo is not None and v < lo):
            raise Invalid(f"expected an integer >= {lo}" if lo is not None else "expected an integer")
        return v

    return parse


def number(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
    """A finite float in [lo, hi] (open ends where asked); TOML ints are accepted."""

    def parse(v):
        lo_s = "(" if lo_open else "["
        hi_s = ")" if hi_open else "]"
        allowed = f"expected a number in {lo_s}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{hi_s}"
        if not (_is_int(v) or isinstance(v, float)) or not math.isfinite(v):
            raise Invalid(allowed)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise Invalid(allowed)
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise Invalid(allowed)
        return float(v)

    return parse


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise Invalid("expected true or false")
    return v


CHECKPOINTING_MODES = ("selective", "offload")


def checkpointing_spec(v: Any) -> bool | str | int:
    """activation_checkpointing: true / false, 'selective', 'offload', or N ≥ 1 (every N-th layer)."""
    if isinstance(v, bool) or v in CHECKPOINTING_MODES:
        return v
    if isinstance(v, int) and v >= 1:
        return v
    raise Invalid("expected true, false, 'selective', 'offload' or a whole number N >= 1 (every N-th layer)")


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise Invalid("expected a string")
    return v


def choice(*options: str) -> Callable[[Any], str]:
    def parse(v):
        if isinstance(v, bool) or v not in options:
            raise Invalid("expected one of " + ", ".join(repr(o) for o in options))
        return v

    return parse


def any_case(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`parse` of the lower-cased value, as qlora-pipe-lite compares it."""
    return lambda v: parse(v.lower() if isinstance(v, str) else v)


def token_ids(v: Any) -> tuple[int, ...]:
    if _is_int(v):
        v = [v]
    if not isinstance(v, list) or not all(_is_int(t) and t >= 0 for t in v):
        raise Invalid("expected a token id (integer >= 0) or a list of them")
    return tuple(v)


def token_spec(v: Any) -> str | tuple[int, ...]:
    """sequence_prefix / document_suffix: a string to tokenize, or token id(s)."""
    if isinstance(v, str):
        return v
    try:
        return token_ids(v)
    except Invalid:
        raise Invalid("expected a string, a token id or a list of token ids") from None


def mask_spec(v: Any) -> bool | tuple[int, ...]:
    if isinstance(v, bool):
        return v
    try:
        return token_ids(v)
    except Invalid:
        raise Invalid("expected true (all special tokens), false, a token id or a list of ids") from None


DATA_FORMATS = ("auto", "text", "messages", "sharegpt", "alpaca", "prompt_completion")
# the record fields each format reads, under these names unless `fields` renames them
FIELD_NAMES = (
    "text",
    "messages",
    "role",
    "content",
    "train",
    "conversations",
    "from",
    "value",
    "system",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
)


def field_names(v: Any) -> tuple[tuple[str, str], ...]:
    """`fields = { messages = "conversation", ... }`: cap's name of a record field → the name in the data."""
    if not isinstance(v, dict) or not all(isinstance(x, str) and x for x in v.values()):
        raise Invalid("expected a table of field names, e.g. { messages = 'conversation', role = 'speaker' }")
    unknown = sorted(set(v) - set(FIELD_NAMES))
    if unknown:
        raise Invalid(f"unknown field '{unknown[0]}' (known: {', '.join(FIELD_NAMES)})")
    return tuple(sorted(v.items()))


def role_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
        raise Invalid("expected a non-empty list of roles, e.g. ['assistant']")
    return tuple(v)


def module_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(s, str) and s for s in v):
        raise Invalid("expected a non-empty list of module names, e.g. ['q_proj', 'v_proj']")
    return tuple(v)


_LAYER_PART = re.compile(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", re.ASCII)


def layer_range(v: Any) -> tuple[int, ...] | None:
    """qlora-pipe-lite's forms → sorted unique layer indices (first layer 0): a string of comma-separated
    'a:b' ranges (both ends inclusive) and single layers ('0:10, 20:25, 30'), a layer index, or a list
    of indices. A string with no parts ('') means all layers (None), as there."""
    allowed = (
        "expected 'first:last' (inclusive, e.g. '0:29'), comma-separated ranges and layers "
        "(e.g. '0:10, 20:25, 30'), a layer index or a list of layer indices"
    )
    if _is_int(v) and v >= 0:
        return (v,)
    if isinstance(v, str):
        layers = []
        for part in v.split(","):
            if not part.strip():
                continue
            m = _LAYER_PART.fullmatch(part)
            if not m:
                raise Invalid(allowed)
            a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if a > b:
                raise Invalid(f"{allowed}; first ({a}) is after last ({b})")
            layers.extend(range(a, b + 1))
        return tuple(sorted(set(layers))) if layers else None
    if isinstance(v, list) and v and all(_is_int(i) and i >= 0 for i in v):
        return tuple(sorted(set(v)))
    raise Invalid(allowed)


def target_modules_spec(v: Any) -> tuple[str, ...] | None:
    """A list of module names, or PEFT's 'all-linear' (every linear layer but the LM head) = None."""
    if v == "all-linear":
        return None
    try:
        return module_names(v)
    except Invalid:
        raise Invalid("expected 'all-linear' or a non-empty list of module names, e.g. ['q_proj', 'v_proj']") from None


# DeepSpeed matches a 'type:<regex>' partition_method against the pipeline layers' class names
# (case-insensitive search); these are cap's (cap_common/models/layers.py).
_PIPELINE_LAYER_CLASSES = ("EmbeddingPipe", "DecoderLayerPipe", "LmHeadPipe")


def partition_spec(v: Any) -> str:
    """qlora-pipe-lite's partition_method, checked as it checks it: 'uniform', 'parameters' or 'type:<regex>'."""
    allowed = "expected 'uniform', 'parameters' or 'type:<regex>' (e.g. 'type:decoderlayer')"
    if not isinstance(v, str):
        raise Invalid(allowed)
    if v.lower() in ("uniform", "parameters"):
        return v
    if v.lower().startswith("type:"):
        try:
            re.compile(v[5:])
        except re.error:
            raise Invalid(allowed) from None
        return v
    raise Invalid(allowed)


def splits_by_decoder_layers(method: str) -> bool:
    """Whether partition_method means what cap does, an equal number of decoder layers per stage: 'uniform', or
    'type:<regex>' matching the decoder layers only. Other values get a note (cap does that all the same)."""
    if method.lower().startswith("type:"):
        pattern = re.compile(method[5:], re.IGNORECASE)
        return [n for n in _PIPELINE_LAYER_CLASSES if pattern.search(n)] == ["DecoderLayerPipe"]
    return method.lower() == "uniform"


# ---------------------------------------------------------------- declarations
def key(default: Any = REQUIRED, parse: Callable[[Any], Any] = text, help: str = ""):
    """Declare a config key: its default, its parser, and its help text."""
    kw = {} if default is REQUIRED else {"default": default}
    return dataclasses.field(metadata={"parse": parse, "help": help}, **kw)


@dataclass(frozen=True, kw_only=True)
class DatasetConfig:
    """One `[[datasets]]` entry."""

    dataset_path: str = key(help="glob of .txt (one document per file), .json, .jsonl or .parquet files")
    control_class: int = key(
        1, choice(1, -1, 0), help="+1 enhance, -1 suppress, 0 neutral (each document randomly +1/-1, seeded)"
    )
    document_prefix: str | tuple[int, ...] | None = key(
        None,
        token_spec,
        help="put before each document: '' nothing; a string is prepended to the text before tokenizing; "
        "token id(s) are put before its tokens (default: the top-level document_prefix)",
    )
    document_suffix: str | tuple[int, ...] | None = key(
        None,
        token_spec,
        help="appended to each document: default EOS if the tokenizer did not add one; '' nothing; "
        "a string to tokenize; token id(s) (default: the top-level document_suffix)",
    )
    drop_tails: bool | None = key(
        None, boolean, help="drop_tails for this dataset's documents (default: the top-level drop_tails)"
    )
    max_tokens: int | None = key(
        None,
        integer(1),
        help="use at most this many of the dataset's tokens: its documents in a seeded random order are kept "
        "while their running total (prefix and suffix included) stays within it; the first that would pass it "
        "and all after are dropped (default: all)",
    )
    format: str = key(
        "auto",
        choice(*DATA_FORMATS),
        help="cap: the records' format: 'text', or a conversation: 'messages' (role/content), 'sharegpt' "
        "(conversations of from/value), 'alpaca' (instruction/input/output), 'prompt_completion'; 'auto' "
        "tells from the first record's fields",
    )
    fields: tuple[tuple[str, str], ...] | None = key(
        None, field_names, help="cap: rename the record fields a format reads, e.g. { messages = 'conversation' }"
    )
    train_roles: tuple[str, ...] | None = key(
        None, role_names, help="cap: roles whose turns train (default: the top-level train_roles)"
    )


# keys a run record (to_dict) holds only when not at their default, so that records of runs from before they
# existed compare equal
_RECORDED_WHEN_SET = ("document_prefix", "max_tokens", "drop_tails", "format", "fields", "train_roles")


@dataclass(frozen=True, kw_only=True)
class Config:
    """A validated cap config. Paths are absolute; `source` is the TOML file it came from."""

    # model and output
    model_dir: Path = key(help="Hugging Face model folder (config.json + safetensors)")
    output_dir: Path = key(help="where checkpoints, epoch<N>/ adapters and tensorboard/ go")
    prepared_dir: Path | None = key(None, help="cap: where cap-prep writes its shards (default <output_dir>/prepared)")
    # optimizer
    lr: float = key(parse=number(0, lo_open=True), help="learning rate (optimi Adam, Kahan summation for bf16 params)")
    epochs: int = key(1, integer(1), help="passes over the training data")
    beta1: float = key(0.9, number(0, 1, hi_open=True), help="Adam beta1")
    beta2: float = key(0.99, number(0, 1, hi_open=True), help="Adam beta2")
    eps: float = key(1e-6, number(0, lo_open=True), help="Adam epsilon")
    warmup: str = key(
        "rms_ratio",
        choice("rms_ratio", "linear", "none"),
        help="cap: 'rms_ratio' lr*sqrt((1-b2^t)/(1+b2^t)) as the reference; 'linear' over warmup_fraction; 'none'",
    )
    warmup_fraction: float = key(0.0, number(0, 1, hi_open=True), help="cap: fraction of steps for linear warmup")
    lr_scheduler: str = key(
        "constant", choice("constant", "cosine"), help="cap: after warmup, constant or cosine decay to min_lr"
    )
    min_lr: float = key(0.0, number(0), help="cap: floor of the cosine decay")
    max_grad_norm: float = key(1.0, number(0), help="cap: gradient clipping norm, 0 = off")
    max_steps: int = key(0, integer(0), help="cap: stop after this many optimizer steps, 0 = no limit")
    seed: int = key(42, integer(0), help="cap: seed for data order, splits, neutral classes and init")
    # batching and parallelism
    sequence_len: int = key(parse=integer(2), help="tokens per packed sequence")
    micro_batch_size: int = key(1, integer(1), help="cap: sequences per micro batch")
    gradient_accumulation_steps: int = key(
        1, integer(1), help="micro batches per optimizer step (per data-parallel rank)"
    )
    eval_gradient_accumulation_steps: int | None = key(
        None, integer(1), help="micro batches per eval batch (default: gradient_accumulation_steps)"
    )
    pipeline_stages: int = key(1, integer(1), help="pipeline stages; must divide the world size")
    partition_method: str = key(
        "type:decoderlayer",
        partition_spec,
        help="how layers are split over pipeline stages: cap always gives each stage an equal number of decoder "
        "layers, which 'uniform' and 'type:<regex matching decoder layers>' mean; 'parameters' and other "
        "'type:' regexes are accepted with a note",
    )
    use_column_major_topology: bool = key(
        False,
        boolean,
        help="one replica's pipeline stages on neighbouring ranks, one node "
        "(hidden states over NVLink, adapter grads over the network)",
    )
    activation_checkpointing: bool | str | int = key(
        True,
        checkpointing_spec,
        help="cap: recompute decoder layers in backward: true (every layer), false, 'selective' (keep the base "
        "model's matmul and attention outputs, recompute the rest), 'offload' (every layer, its input held in "
        "host memory), or N (every N-th layer)",
    )
    compile_layers: bool = key(
        False,
        boolean,
        help="cap: torch.compile each decoder layer (fuses the elementwise ops between the matmuls; the "
        "first steps pay the compilation; on CPU it needs a C++ compiler, without one the layers run uncompiled; "
        "not with load_in_4bit)",
    )
    model_dtype: str = key(
        "bfloat16", choice("bfloat16", "float32"), help="cap: dtype of the (non-quantized) base weights"
    )
    # adapters
    use_control_adapters: bool = key(False, boolean, help="train Control Adapters (else LoRA, or full fine-tune)")
    control_adapter_type: str = key(
        "full",
        choice("full", "symmetrise", "antisymmetrise", "spectral"),
        help="structure of W' (without use_control_adapters: a note, no effect)",
    )
    control_adapter_target: str = key(
        "block",
        choice("block", "writers"),
        help="cap: apply to the whole block delta, or to each residual writer (exactly exportable)",
    )
    lora_rank: int | None = key(None, integer(1), help="adapter rank r (required for adapters)")
    lora_alpha: float | None = key(None, number(0, lo_open=True), help="scale = alpha / r (default sqrt(r), rsLoRA)")
    lora_dropout: float = key(0.0, number(0, 1, hi_open=True), help="dropout on the adapter input")
    lora_weight_decay: float = key(0.0, number(0), help="decoupled weight decay on W = s*B*A (needs float32 adapters)")
    lora_weight_decay_type: str = key(
        "nuclear", any_case(choice("nuclear", "l2", "l1")), help="regularizer of W (any case)"
    )
    lora_max_norm: float = key(0.0, number(0), help="max Frobenius norm of W, 0 = off")
    lora_weight_dtype: str = key("float32", choice("float32", "bfloat16", "float16"), help="adapter parameter dtype")
    control_adapter_gamma: float | None = key(
        None,
        number(0, 0.5, lo_open=True),
        help="accepted, no effect: qlora-pipe-lite's re-orthogonalization step for Q; cap's spectral Q is "
        "exactly orthonormal",
    )
    target_modules: tuple[str, ...] | None = key(
        None,
        target_modules_spec,
        help="LoRA target modules; 'all-linear' or unset: every linear layer but the LM head; "
        "full fine-tune: only weights whose name contains one train; not with control adapters",
    )
    layers_to_transform: tuple[int, ...] | None = key(
        None,
        layer_range,
        help="'a:b' inclusive, comma-separated ranges and layers ('0:10, 20:25, 30'), an index or a list "
        "(default: all layers); full fine-tune: other decoder layers stay frozen",
    )
    load_in_4bit: bool = key(False, boolean, help="quantize the base to 4-bit nf4 (QLoRA)")
    full_fine_tune: bool = key(False, boolean, help="train all weights in bf16")
    # checkpoints and eval
    checkpoint_interval_hours: float = key(
        1.0, number(0, lo_open=True), help="hours between checkpoints (fractions allowed)"
    )
    max_checkpoints: int = key(3, integer(), help="checkpoints kept (0 or less: all)")
    eval_fraction: float = key(0.01, number(0, 1, hi_open=True), help="fraction of documents held out for eval")
    evals_per_run: int = key(11, integer(0), help="evals per run, including one before training and one at the end")
    evals_per_epoch: int | None = key(
        None,
        integer(1),
        help="instead of evals_per_run: evals at evenly spaced steps of each epoch (the last at its end), "
        "plus one before training",
    )
    # data
    max_sequences: int | None = key(None, integer(1), help="cap on the number of sequences (default unlimited)")
    drop_tails: bool = key(False, boolean, help="drop the partial sequence at each document's end")
    mix_datasets: bool = key(False, boolean, help="let one sequence hold tokens of several datasets")
    sequence_prefix: str | tuple[int, ...] | None = key(
        None, token_spec, help="tokens starting each sequence (default BOS if any)"
    )
    document_prefix: str | tuple[int, ...] | None = key(
        None, token_spec, help="default of every dataset's document_prefix (see datasets.document_prefix)"
    )
    document_suffix: str | tuple[int, ...] | None = key(
        None, token_spec, help="default of every dataset's document_suffix (see datasets.document_suffix)"
    )
    mask_tokens: bool | tuple[int, ...] = key(
        False, mask_spec, help="tokens given class 0 / label -100: true = all special tokens, or ids"
    )
    add_prefix_space: bool = key(False, boolean, help="tokenizer add_prefix_space (also --add-prefix-space)")
    chat_template: Path | None = key(
        None, help="cap: a Jinja chat template file for conversation data (default: the tokenizer's own)"
    )
    train_roles: tuple[str, ...] = key(
        ("assistant",),
        role_names,
        help="cap: in conversation data, the roles whose turns train (with their end-of-turn token); every "
        "other token gets class 0",
    )
    document_attention: bool | None = key(
        None,
        boolean,
        help="cap: in a packed sequence each document attends only to itself and its positions start at 0 "
        "(default: on when a dataset is a conversation format, off for raw text)",
    )
    datasets: tuple[DatasetConfig, ...] = key(help="[[datasets]] tables")
    source: Path = dataclasses.field(default=Path("config.toml"), metadata={"internal": True})

    # ------------------------------------------------------------ derived
    @property
    def mode(self) -> str:
        """'control', 'full', 'qlora' or 'lora'."""
        if self.use_control_adapters:
            return "control"
        if self.full_fine_tune:
            return "full"
        return "qlora" if self.load_in_4bit else "lora"

    @property
    def alpha(self) -> float:
        """lora_alpha, defaulting to sqrt(rank) (rsLoRA)."""
        return self.lora_alpha if self.lora_alpha is not None else math.sqrt(self.lora_rank)

    @property
    def compiles_layers(self) -> bool:
        """compile_layers as it applies: not to 4-bit layers, which inductor miscompiles."""
        return self.compile_layers and not self.load_in_4bit

    @property
    def regularizes(self) -> bool:
        """Whether the adapters get a decoupled regularization step (common/adapters/regularize.py)."""
        return self.lora_weight_decay > 0 or self.lora_max_norm > 0

    @property
    def eval_accumulation(self) -> int:
        return self.eval_gradient_accumulation_steps or self.gradient_accumulation_steps

    @property
    def prepared_root(self) -> Path:
        return self.prepared_dir or self.output_dir / "prepared"

    def drops_tails(self, dataset: DatasetConfig) -> bool:
        """drop_tails as it applies to `dataset`: its own value, else the top-level one."""
        return self.drop_tails if dataset.drop_tails is None else dataset.drop_tails

    def check_world_size(self, world_size: int) -> int:
        """Data-parallel degree = world / pipeline_stages; the stages must divide the world."""
        stages = self.pipeline_stages
        if world_size % stages:
            raise CapError(
                f"{self.source}: pipeline_stages = {stages} must divide the world size ({world_size} processes): "
                f"run with --num-gpus {max(stages, world_size // stages * stages)} (a multiple of pipeline_stages)"
            )
        return world_size // stages

    def to_dict(self) -> dict:
        """Plain, JSON-able dict of every key (paths as strings)."""

        def plain(v):
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            if dataclasses.is_dataclass(v):
                return {
                    f.name: plain(getattr(v, f.name))
                    for f in dataclasses.fields(v)
                    if not (f.name in _RECORDED_WHEN_SET and getattr(v, f.name) == f.default)
                }
            return v

        return {
            f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get("internal")
        }


# ---------------------------------------------------------------- loading
def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _parse_table(cls, table: dict, where: str, skip=()) -> dict:
    """Check every key of `table` against `cls`'s declarations; parse the values."""
    fields = _fields(cls)
    for name in table:
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise CapError(f"{where}: unknown key '{name}'{hint}")
    out = {}
    for name, f in fields.items():
        if name in skip:
            continue
        if name not in table:
            if f.default is dataclasses.MISSING:
                raise CapError(f"{where}: missing required key '{name}' ({f.metadata['help']})")
            continue
        try:
            out[name] = f.metadata["parse"](table[name])
        except Invalid as e:
            raise CapError(f"{where}: {name} = {table[name]!r}: {e}") from None
    return out


def _model_layers(model_dir: Path, where: str, full_fine_tune: bool) -> int | None:
    """The model's number of decoder layers (None when config.json does not say); a model_type cap
    cannot train is refused here, before anything runs."""
    # not at import: cap_common.models imports torch
    from cap_common.models.families import MULTIMODAL, check_model_type

    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CapError(f"{where}: {model_dir}/config.json is not valid JSON ({e})") from None
    if isinstance(cfg, dict) and "model_type" in cfg:
        check_model_type(cfg, where)
        if full_fine_tune and cfg["model_type"] in MULTIMODAL:
            raise CapError(
                f"{where}: full_fine_tune of a multimodal model ({cfg['model_type']}) is not supported yet (it would "
                "write its text model alone); train adapters and `cap-export merge` them into the checkpoint"
            )
    cfg = cfg.get("text_config", cfg)
    return cfg.get("num_hidden_layers")


def _check_modes(c: Config, where: str, present: set[str]) -> None:
    """Checks that involve more than one key."""

    def err(msg):
        raise CapError(f"{where}: {msg}")

    if c.use_control_adapters and c.full_fine_tune:
        err("use_control_adapters and full_fine_tune are mutually exclusive")
    if c.full_fine_tune and c.load_in_4bit:
        err("full_fine_tune and load_in_4bit are mutually exclusive (a 4-bit base cannot be trained)")
    if c.use_control_adapters and (c.target_modules is not None or "target_modules" in present):
        err("target_modules is not allowed with use_control_adapters (control adapters act on whole layers)")
    if "evals_per_run" in present and "evals_per_epoch" in present:
        err(
            "evals_per_run and evals_per_epoch are mutually exclusive "
            "(evals_per_run: evals over the whole run; evals_per_epoch: evals in each epoch)"
        )
    if not c.full_fine_tune and c.lora_rank is None:
        err(f"missing required key 'lora_rank' (needed for {c.mode} training)")
    if c.lora_weight_dtype == "float16":  # qlora-pipe-lite's later generation takes it
        err(
            "lora_weight_dtype = 'float16' is not supported: DeepSpeed's pipeline engine reduces float32 "
            "and bfloat16 gradients only; use 'bfloat16' (or the default 'float32')"
        )
    if c.lora_weight_decay > 0 and c.lora_weight_dtype != "float32":
        err(
            f"lora_weight_decay = {c.lora_weight_decay} needs lora_weight_dtype = 'float32' "
            f"(got '{c.lora_weight_dtype}': bf16 cancels the decay)"
        )
    if c.full_fine_tune and c.regularizes:
        err("lora_weight_decay / lora_max_norm are not supported with full_fine_tune")
    if not c.use_control_adapters:
        if "control_adapter_target" in present:  # cap's key; qlora-pipe-lite ignores control_adapter_type (a note)
            err("control_adapter_target needs use_control_adapters = true")
        for i, d in enumerate(c.datasets):
            if d.control_class != 1:
                err(
                    f"datasets[{i}].control_class = {d.control_class}: "
                    "classes -1 and 0 need use_control_adapters = true"
                )
    if c.warmup == "linear" and c.warmup_fraction == 0:
        err("warmup = 'linear' needs warmup_fraction > 0")
    if c.warmup != "linear" and c.warmup_fraction > 0:
        err(f"warmup_fraction = {c.warmup_fraction} needs warmup = 'linear'")
    if c.min_lr > c.lr:
        err(f"min_lr = {c.min_lr} must not exceed lr = {c.lr}")


_noted: set[str] = set()


def _notes(c: Config, where: str, present: set[str], more: list[str]) -> None:
    """One line on stderr, once per process, for each key that is accepted but has no effect in cap, and for
    each of `more` (defaults taken from qlora-pipe-lite's Oct-2025 generation, paths found two ways).
    Worker processes stay quiet (`_says_notes`): the command that started them has said it."""
    notes = []
    if c.control_adapter_gamma is not None:
        notes.append(
            f"control_adapter_gamma = {c.control_adapter_gamma:g} has no effect in cap: it sizes qlora-pipe-lite's "
            "step that pulls Q back towards orthonormal, and cap's spectral control adapter uses an exactly "
            "orthonormal Q (a QR of the parameter in every forward), so there is nothing to correct"
        )
    if not splits_by_decoder_layers(c.partition_method):
        notes.append(
            f"partition_method = {c.partition_method!r}: cap always gives every pipeline stage an equal number of "
            "decoder layers (what 'parameters' approximates)"
        )
    if "control_adapter_type" in present and not c.use_control_adapters:
        notes.append(
            f"control_adapter_type = {c.control_adapter_type!r} has no effect without use_control_adapters = true"
        )
    for text in notes + more:
        line = f"note: {where}: {text}"
        if line not in _noted and _says_notes():
            _noted.add(line)
            print(line, file=sys.stderr, flush=True)


def _says_notes() -> bool:
    """Not a worker cap-train's launcher started (CAP_WORKER), nor a rank other than 0 of a run torchrun
    or srun started (RANK, SLURM_PROCID): one process of a run says the config's notes."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return os.environ.get("CAP_WORKER") != "1" and rank == "0"


# ---------------------------------------------------------------- qlora-pipe-lite's two generations
# Keys only its Oct-2025 generation reads, and keys only its Aug-2025 one reads ("datasets." = a [[datasets]] key).
OCT_2025_ONLY = (
    "evals_per_epoch",
    "control_adapter_gamma",
    "partition_method",
    "document_prefix",
    "datasets.max_tokens",
)
AUG_2025_ONLY = (
    "lora_alpha",
    "lora_weight_decay_type",
    "lora_max_norm",
    "control_adapter_type",
    "evals_per_run",
    "datasets.document_suffix",
    "datasets.drop_tails",
)


# The keys whose Oct-2025 default differs from cap's (= the Aug-2025 generation's).
_OCT_2025_DEFAULTS = ("control_adapter_type", "lora_alpha", "lora_weight_decay_type", "evals_per_epoch")


def _generation_defaults(raw: dict, values: dict) -> list[str]:
    """A config of qlora-pipe-lite's Oct-2025 generation — a key only it reads, and none that only the Aug-2025
    generation or only cap ("cap:" in the help) reads, the keys adopted here aside (setting one, as its note
    says, pins that key alone) — trains as that generation does: each of those keys it leaves unset takes
    that generation's value in `values`. Returns the notes saying so."""
    given = set(raw) | {f"datasets.{k}" for t in raw["datasets"] for k in t}
    cap_only = {name for name, f in _fields(Config).items() if f.metadata["help"].startswith("cap:")}
    signals = [k for k in OCT_2025_ONLY if k in given]
    if not signals or given & ((set(AUG_2025_ONLY) - set(_OCT_2025_DEFAULTS)) | cap_only):
        return []
    adopted = {}
    adapters = not values.get("full_fine_tune") and values.get("lora_rank") is not None
    if adapters and values.get("use_control_adapters"):
        adopted["control_adapter_type"] = "spectral"  # Q·diag(eˢ − 1)·Qᵀ, exact inverse for class −1
    elif adapters:
        adopted["lora_alpha"] = values["lora_rank"]  # it ignores lora_alpha: scale 1
    if values.get("lora_weight_decay", 0) > 0:
        adopted["lora_weight_decay_type"] = "l2"  # ½‖B·A‖² (LoRA), ½‖S‖² (spectral)
    if "evals_per_epoch" not in given:
        adopted["evals_per_epoch"] = 10
    adopted = {k: v for k, v in adopted.items() if k not in given}
    fields = _fields(Config)
    values.update({k: fields[k].metadata["parse"](v) for k, v in adopted.items()})
    why = f"qlora-pipe-lite Oct-2025 config ({', '.join(signals)})"
    return [f"{why}: {k} = {v!r} as it trained (set {k} to choose)" for k, v in adopted.items()]


# The keys that name a path (resolve_path: a relative one is found next to the config, else under the
# working directory): top-level ones, and those of each [[datasets]] table.
PATH_KEYS = ("model_dir", "output_dir", "prepared_dir", "chat_template")
DATASET_PATH_KEYS = ("dataset_path",)


def resolve_path(name: str, value: str, base: Path, output: bool = False, pattern: bool = False):
    """(path, note or None): where relative path `value` of key `name` points. Next to the config (`base`) when
    it exists there (an output: when its parent does), else under the working directory (qlora-pipe-lite's
    base) when it exists there, else next to the config. When both exist, next to the config wins and the
    note names both. A `pattern` (a glob) exists where it matches something."""
    path = Path(value)
    if path.is_absolute():
        return path, None
    here, cwd = base / path, Path.cwd() / path

    def exists(p: Path) -> bool:
        return next(glob.iglob(str(p), recursive=True), None) is not None if pattern else p.exists()

    if exists(here) or (output and here.parent.is_dir()):
        both = exists(here) and exists(cwd) and here.resolve() != cwd.resolve()
        note = f"{name} = '{value}' is {here} (next to the config), not {cwd} (under the working directory)"
        return here, note if both else None
    if exists(cwd) or (output and cwd.parent.is_dir()):
        return cwd, None
    return here, None


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read, check and freeze a config. `overrides` (e.g. from the CLI) replace TOML keys."""
    path = Path(path)
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CapError(f"{where}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CapError(f"{where}: cannot read config ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise CapError(f"{where}: invalid TOML: {e}") from None
    raw.update(overrides or {})
    return config_from_dict(raw, path)


def config_from_dict(raw: dict, path: Path) -> Config:
    where = str(path)
    base = path.resolve().parent
    values = _parse_table(Config, raw, where, skip=("datasets",))
    more = []  # notes
    # datasets
    tables = raw.get("datasets")
    if tables is None:
        raise CapError(f"{where}: missing required key 'datasets' (add at least one [[datasets]] table)")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise CapError(f"{where}: datasets: expected one or more [[datasets]] tables")
    datasets = []
    for i, t in enumerate(tables):
        d = _parse_table(DatasetConfig, t, f"{where}: datasets[{i}]")
        for name in DATASET_PATH_KEYS:  # globs
            found, note = resolve_path(f"datasets[{i}].{name}", d[name], base, pattern=True)
            d[name], more = str(found), more + ([note] if note else [])
        for name in ("document_prefix", "document_suffix"):  # the top-level key is every dataset's default
            if name not in t and name in values:
                d[name] = values[name]
        datasets.append(DatasetConfig(**d))
    values["datasets"] = tuple(datasets)
    # paths
    for name in PATH_KEYS:
        if name in values:
            found, note = resolve_path(name, values[name], base, output=name != "model_dir")
            values[name], more = found.resolve(), more + ([note] if note else [])
    model_dir = values["model_dir"]
    if not model_dir.is_dir():
        elsewhere = "" if Path(raw["model_dir"]).is_absolute() else ", nor under the working directory"
        raise CapError(f"{where}: model_dir = '{raw['model_dir']}': folder not found ({model_dir}{elsewhere})")
    if not (model_dir / "config.json").is_file():
        raise CapError(
            f"{where}: model_dir = '{raw['model_dir']}': no config.json in {model_dir} "
            "(expected a Hugging Face model folder)"
        )
    more = _generation_defaults(raw, values) + more
    cfg = Config(**values, source=path)
    _check_modes(cfg, where, set(raw))
    n_layers = _model_layers(model_dir, f"{where}: model_dir = '{raw['model_dir']}'", cfg.full_fine_tune)
    if n_layers is not None:
        if cfg.layers_to_transform and cfg.layers_to_transform[-1] >= n_layers:
            raise CapError(
                f"{where}: layers_to_transform = {raw['layers_to_transform']!r}: layer "
                f"{cfg.layers_to_transform[-1]} does not exist (the model has layers 0:{n_layers - 1})"
            )
        if cfg.pipeline_stages > n_layers:
            raise CapError(
                f"{where}: pipeline_stages = {cfg.pipeline_stages}: more stages than the model's {n_layers} layers"
            )
    _notes(cfg, where, set(raw), more)
    return cfg


# ---------------------------------------------------------------- the copy cap-train keeps in output_dir
COPY_HEADER = "# cap-train: the config this run used, every path key written as the absolute path the run used"
_ORIGINAL = "# original: "
_STRING = r'"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\''
_DATASETS_TABLE = re.compile(r"\s*\[\[\s*datasets\s*\]\]\s*(?:#.*)?")


def run_copy(cfg: Config) -> str:
    """The text of the config `cfg` was read from, for <output_dir>/config.toml: every path key (PATH_KEYS,
    DATASET_PATH_KEYS) holds the absolute path this run used, so the copy loads to the same config wherever it
    lies and whatever the working directory; the rest is the user's text, under COPY_HEADER and a line naming
    the original (kept when `cfg` was read from such a copy). Where a path is not a one-line string on its own
    line, the copy is the parsed config written out anew (same keys and values, without the comments)."""
    source = Path(cfg.source)
    try:
        text = source.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CapError(f"{source}: cannot read config ({e})") from None
    lines = text.splitlines(keepends=True)
    original = str(source.resolve())
    if len(lines) > 1 and lines[0].rstrip("\r\n") == COPY_HEADER and lines[1].startswith(_ORIGINAL):
        original = (_parse_toml(f"v = {lines[1][len(_ORIGINAL) :]}") or {}).get("v", original)
        lines = lines[2:]
    top = {name: str(getattr(cfg, name)) for name in PATH_KEYS if name in raw}
    tables = [{name: str(getattr(d, name)) for name in DATASET_PATH_KEYS} for d in cfg.datasets]
    wanted = {**raw, **top, "datasets": [{**t, **paths} for t, paths in zip(raw["datasets"], tables)]}
    body = _set_paths(lines, top, tables)
    if _parse_toml(body) != wanted:
        body = toml_document(wanted)
    return f"{COPY_HEADER}\n{_ORIGINAL}{_toml_string(original)}\n{body}"


def _set_paths(lines: list[str], top: dict[str, str], tables: list[dict[str, str]]) -> str:
    """`lines` with each `key = "…"` line of `top` (before the first table) and of the i-th [[datasets]]
    table (`tables[i]`) given the new value; comments and everything else kept. run_copy checks the result."""
    out, table = [], -1  # -1: the top level; None: a table that is not [[datasets]]
    for line in lines:
        body = line.rstrip("\r\n")
        eol = line[len(body) :]
        if _DATASETS_TABLE.fullmatch(body):
            table = table + 1 if table is not None else None
        elif body.lstrip().startswith("["):
            table = None
        wanted = top if table == -1 else tables[table] if table is not None and table < len(tables) else {}
        for name, value in wanted.items():
            m = re.fullmatch(rf"(\s*(?:{name}|\"{name}\"|'{name}')\s*=\s*)(?:{_STRING})(\s*(?:#.*)?)", body)
            if m:
                body = m.group(1) + _toml_string(value) + m.group(2)
        out.append(body + eol)
    return "".join(out)


def _parse_toml(text: str) -> dict | None:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def _toml_string(s: str) -> str:
    """A TOML basic string holding `s`."""
    escaped = s.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return _toml_string(str(v))


def toml_document(raw: dict) -> str:
    """A config's keys as TOML: top-level keys, then one [[datasets]] table each (a validated config holds
    only strings, numbers, booleans and lists of them)."""

    def assignments(table: dict) -> list[str]:
        return [
            f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else _toml_string(k)} = {_toml_value(v)}"
            for k, v in table.items()
            if k != "datasets"
        ]

    lines = assignments(raw)
    for table in raw["datasets"]:
        lines += ["", "[[datasets]]", *assignments(table)]
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The config reference table for the README, generated from the declarations."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for cls, prefix in ((Config, ""), (DatasetConfig, "datasets.")):
        for name, f in _fields(cls).items():
            if name == "datasets":
                continue
            default = "required" if f.default is dataclasses.MISSING else f"`{f.default!r}`"
            rows.append(f"| `{prefix}{name}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())
