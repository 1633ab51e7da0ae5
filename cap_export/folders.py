"""Adapter folders and provenance: which folder holds an adapter's two files, and the
cap_export.json record that cap-export writes beside each export (what it was made from).

- `adapter_folder`: an epoch<N>/ folder, a plain adapter folder, a cap training checkpoint
  (checkpoints/step<N>/: its adapter is assembled into a temporary folder, removed at exit), or a
  training checkpoint with an adapter/ subfolder → the folder holding adapter_model.safetensors (or
  qlora-pipe-lite's adapter_model.bin) + adapter_config.json; `named_folder` names what the user gave.
- `run_toml_type`: the control_adapter_type of a qlora-pipe-lite Aug 2025 run, from the training
  TOML it copied into the run folder (its adapter_config.json lost that field).
- `read_provenance`: the cap_export.json beside an export, its values checked against
  `PROVENANCE_TYPES` (the writers are convert and merge, with cap_common.files.write_json).
Every user-facing problem is a one-line CapError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from cap_common.adapters.io import BIN_NAME, CONFIG_NAME, WEIGHTS_NAME, check_types, is_int, is_number
from cap_common.errors import CapError

PROVENANCE = "cap_export.json"  # beside an exported LoRA or merged model: what it was made from

# Which matrix of W' an export uses: W'₊ (class +1), the exact inverse (I+W')⁻¹−I, or −W'.
DIRECTIONS = ("forward", "inverse", "negate")


_ASSEMBLED: dict[Path, Path] = {}  # checkpoint → the temporary folder holding its adapter (this process)


def adapter_folder(path) -> Path:
    """The folder holding the two adapter files: `path` itself, `path`/adapter/ (training checkpoint),
    or for a cap checkpoint the temporary folder its adapter was assembled into (once per process)."""
    path = Path(path)
    if not path.exists():
        raise CapError(f"{path}: not found")
    if not path.is_dir():
        raise CapError(
            f"{path}: not a folder (expected an epoch<N>/ or adapter folder with {WEIGHTS_NAME} and {CONFIG_NAME})"
        )
    if any((path / name).exists() for name in (WEIGHTS_NAME, BIN_NAME, CONFIG_NAME)):
        return path
    if (path / "state.json").is_file() and any(path.glob("trainable-stage*.safetensors")):
        return _assemble(path)
    if any((path / "adapter" / name).exists() for name in (WEIGHTS_NAME, BIN_NAME)):
        return path / "adapter"
    if (path / "ds").is_dir():
        raise CapError(
            f"{path}: a training checkpoint without an adapter/ subfolder; use the epoch<N>/ folder "
            f"(or a checkpoint that holds adapter/{WEIGHTS_NAME} and adapter/{CONFIG_NAME})"
        )
    raise CapError(
        f"{path}: no {WEIGHTS_NAME} (or {BIN_NAME}) and {CONFIG_NAME} here (expected an epoch<N>/ or adapter folder)"
    )


def _assemble(checkpoint: Path) -> Path:
    """The adapter of a cap checkpoint, written as its run writes epoch<N>/ (cap_train.outputs), into a
    temporary folder that is removed when this process exits."""
    import atexit
    import shutil
    import tempfile

    from cap_train.outputs import write_checkpoint_adapter

    key = checkpoint.resolve()
    if key not in _ASSEMBLED:
        scratch = Path(tempfile.mkdtemp(prefix="cap-export-checkpoint-"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        folder = scratch / checkpoint.name
        try:
            write_checkpoint_adapter(checkpoint, folder)
        except OSError as e:
            raise CapError(f"{checkpoint}: cannot assemble its adapter in {scratch} ({e.strerror or e})") from None
        _ASSEMBLED[key] = folder
    return _ASSEMBLED[key]


def named_folder(folder: Path) -> Path:
    """The folder to name in messages and records for `folder` (an adapter_folder result): the
    checkpoint for an adapter assembled from one, else `folder` itself."""
    return next((ckpt for ckpt, tmp in _ASSEMBLED.items() if tmp == Path(folder)), Path(folder))


def run_toml_type(folder: Path) -> tuple[str, Path] | None:
    """(control_adapter_type, the TOML) for a qlora-pipe-lite adapter whose adapter_config.json names
    no type: its Aug 2025 version kept `control_adapter_type` (full / symmetrise / antisymmetrise)
    only in the training TOML, which it copies into the run folder, the parent of epoch<N>/. None
    when the config names a type, or no TOML there (or several disagreeing ones) names one."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        if not isinstance(config, dict) or "control_adapter_type" in config:
            return None
    except (OSError, ValueError):
        return None  # load_adapter reports it
    found: dict[str, Path] = {}
    for toml in sorted(folder.parent.glob("*.toml")):
        try:
            kind = tomllib.loads(toml.read_text(encoding="utf-8")).get("control_adapter_type")
        except (OSError, ValueError):
            continue
        if isinstance(kind, str):
            found.setdefault(kind, toml)
    return next(iter(found.items())) if len(found) == 1 else None


def _str_or_null(v) -> bool:
    return v is None or isinstance(v, str)


# cap_export.json key → (accepts the value, what is expected); see convert._provenance and merge.merge.
PROVENANCE_TYPES = {
    **{
        key: (_str_or_null, "a string or null")
        for key in (
            "kind",
            "source",
            "base",
            "lora",
            "lora_kind",
            "model_type",
            "dtype",
            "control_adapter_type",
            "control_adapter_target",
        )
    },
    "direction": (lambda v: v is None or v in DIRECTIONS, f"one of {', '.join(DIRECTIONS)} or null"),
    "rank": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
    "hidden_size": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
    "modules": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "a list of strings or null",
    ),
    "scale": (is_number, "a finite number"),
    "multiplicative": (lambda v: isinstance(v, bool), "true or false"),
}


def read_provenance(folder: Path) -> dict:
    """The cap_export.json record beside an export ({} when there is none); a corrupt one is a CapError."""
    path = Path(folder) / PROVENANCE
    try:
        record = json.loads(path.read_text())
    except OSError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CapError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise CapError(f"{path}: expected a JSON object, got {type(record).__name__}")
    check_types(record, PROVENANCE_TYPES, path)
    return record
