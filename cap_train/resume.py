"""What a resume may change: the checkpoint's recorded run against the config of this launch.

Every key of the config falls in one of four groups:
- applied: optimizer, schedule, regularization, run length, eval and checkpoint cadence, how a
  step is split (micro_batch_size, gradient_accumulation_steps) and the topology (pipeline_stages,
  processes) — a new value takes effect from the first step after the checkpoint, and is printed;
- data: anything that changes which sequences make up a step (the data's content identity: the
  inputs' contents in order, the tokenizer and every cap-prep key — not the files' paths, so a
  moved project resumes as it is; the global batch G = micro · accumulation · replicas; seed) —
  the old position means nothing in a new order, so these need --accept-config-change, and then
  the data restarts at the start of the current epoch;
- model: keys that change what the trained tensors mean but not their shapes (model_dir for a model
  of the same shape, model_dtype, lora_alpha, control_adapter_target, use_column_major_topology)
  — they need --accept-config-change;
- fixed: keys that change which tensors exist, their shapes or dtypes (mode, 4-bit, adapter type,
  rank, target modules, layers, adapter dtype, the model's shape; model_dtype in a full
  fine-tune) — the checkpoint cannot continue under them.
Paths (output_dir, prepared_dir) and add_prefix_space (its effect is in the fingerprint) are not compared.
A qlora-pipe-lite run in output_dir (DeepSpeed checkpoints) cannot be resumed: `refuse_peer_checkpoint` names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cap_common.errors import CapError
from cap_train.order import rows_per_global_step

APPLIED = (
    "lr",
    "beta1",
    "beta2",
    "eps",
    "warmup",
    "warmup_fraction",
    "lr_scheduler",
    "min_lr",
    "max_grad_norm",
    "lora_weight_decay",
    "lora_weight_decay_type",
    "lora_max_norm",
    "lora_dropout",
    "epochs",
    "max_steps",
    "checkpoint_interval_hours",
    "max_checkpoints",
    "evals_per_run",
    "evals_per_epoch",
    "eval_gradient_accumulation_steps",
    "activation_checkpointing",
    "compile_layers",
    # how a step's rows are split over micro batches and replicas, not which rows it reads
    "micro_batch_size",
    "gradient_accumulation_steps",
    # the topology: a format-3 checkpoint is stored by parameter name (cap_train/train_state.py)
    "pipeline_stages",
    "processes",
)
DATA = ("data", "global batch", "seed")
# cap-prep keys: named in the message when the fingerprint changed because of them
PREP = (
    "datasets",
    "sequence_len",
    "sequence_prefix",
    "mask_tokens",
    "drop_tails",
    "mix_datasets",
    "max_sequences",
    "eval_fraction",
    "add_prefix_space",
    "document_prefix",
    "document_suffix",
    "chat_template",
    "train_roles",
    "document_attention",
)
MODEL = ("model_dir", "model_dtype", "lora_alpha", "control_adapter_target", "use_column_major_topology")
FIXED = (
    "use_control_adapters",
    "full_fine_tune",
    "load_in_4bit",
    "control_adapter_type",
    "lora_rank",
    "target_modules",
    "layers_to_transform",
    "lora_weight_dtype",
    "model shape",
)


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key} {_short(self.old)} → {_short(self.new)}"


def _short(value) -> str:
    text = repr(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:g}"
    return text if len(text) <= 80 else text[:77] + "..."


SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def model_shape(model_dir: Path) -> dict:
    """The architecture numbers of model_dir/config.json that the trained tensors depend on."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    return {k: config.get(k) for k in SHAPE_KEYS}


def data_identity(cfg) -> str:
    """What the prepared sequences depend on — the cap-prep keys, the tokenizer files, each input
    file's content in order — but not where the files are (cap-prep's fingerprint without paths)."""
    from cap_prep import cache
    from cap_prep.build import find_inputs

    return cache.fingerprint(cfg, find_inputs(cfg), cache.FileHashes(cfg.prepared_root), paths=False)


def global_batch(config: dict, processes: int | None) -> int | None:
    """Rows per optimizer step over all replicas of a run record's config (replicas = processes /
    pipeline_stages): the data order's unit (cap_train/order.py); None when unknown."""
    if not processes:
        return None
    replicas = processes // config["pipeline_stages"]
    return rows_per_global_step(config["micro_batch_size"], config["gradient_accumulation_steps"], replicas)


def run_record(config: dict, data: str, processes: int | None, model_shape: dict) -> dict:
    """What a checkpoint records about its run, flat: config keys plus the derived ones above;
    datasets without their paths (their contents are in `data`)."""
    config = {**config, "datasets": [{k: v for k, v in d.items() if k != "dataset_path"} for d in config["datasets"]]}
    record = {
        **config,
        "data": data,
        "processes": processes,
        "global batch": global_batch(config, processes),
        "model shape": model_shape,
    }
    return json.loads(json.dumps(record))  # as it reads back from state.json


def changes(old: dict, new: dict) -> list[Change]:
    """Keys (of the four groups, and the cap-prep keys) whose values differ; a key the old record
    lacks, or whose new value is unknown (None for processes under a hostfile), is not compared."""
    out = []
    for key in APPLIED + DATA + PREP + MODEL + FIXED:
        if key in old and key in new and new[key] is not None and old[key] != new[key]:
            out.append(Change(key, old[key], new[key]))
    return out


@dataclass
class Plan:
    applied: list[Change]
    accepted: list[Change]
    restart_epoch: bool  # the data changed: start the current epoch over in the new order


def plan(old: dict, new: dict, accept: bool, where: str) -> Plan:
    """Decide what a resume from a checkpoint recorded as `old` does under `new`; CapError when it can't."""
    found = changes(old, new)
    fixed_keys = FIXED + (("model_dtype",) if new.get("full_fine_tune") else ())  # the trained weights' dtype
    fixed = [c for c in found if c.key in fixed_keys]
    if fixed:
        raise CapError(
            f"{where}: cannot resume: {'; '.join(map(str, fixed))} (the checkpoint's tensors do not fit "
            f"this config: resume with the recorded values, or start a new run in another output_dir)"
        )
    needs = [c for c in found if c.key in DATA + PREP + MODEL and c.key not in fixed_keys]
    if needs and not accept:
        raise CapError(
            f"{where}: the config changed since this checkpoint: {'; '.join(map(str, needs))} "
            f"(pass --accept-config-change to continue anyway"
            f"{', restarting the data at the start of the current epoch' if _data(needs) else ''})"
        )
    return Plan([c for c in found if c.key in APPLIED], needs, _data(needs))


def _data(found: list[Change]) -> bool:
    return any(c.key in DATA + PREP for c in found)


def refuse_peer_checkpoint(cfg) -> None:
    """A CapError naming the newest qlora-pipe-lite checkpoint in output_dir (DeepSpeed's global_step<N>/ in a
    timestamped run folder, or in output_dir itself), which cap cannot resume, and what to do instead."""
    from cap_export.peer import checkpoint_form, epoch_folder

    out = cfg.output_dir
    found = [p for p in (*out.glob("global_step*"), *out.glob("*/global_step*")) if p.name[11:].isdigit()]
    if not found:
        return
    newest = max(found, key=lambda p: (p.parent.name, int(p.name[11:])))  # its runs sort by their timestamp
    if cfg.use_control_adapters:
        what = f"convert its adapter with `{checkpoint_form(newest, str(cfg.model_dir))}`"
    else:
        what = f"its epoch<N>/ folders (e.g. {epoch_folder(newest)}) hold what it trained, in Hugging Face form"
    raise CapError(
        f"{newest}: a qlora-pipe-lite checkpoint, which cap cannot resume (DeepSpeed's format); {what} (an epoch's "
        "adapter; a mid-epoch checkpoint: qlora-pipe-lite's convert_ds_checkpoint.py first), or start from scratch "
        "without --resume-from-checkpoint"
    )
