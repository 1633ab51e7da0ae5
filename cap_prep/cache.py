"""Where a prepared dataset lives, and how it gets there safely (one writer, atomic publish).

Fingerprint: sha256 over the format version, the prep-relevant config keys, the content of the
tokenizer files in model_dir, and each input file's resolved path, size and sha256 of its content.
Content hashes are remembered in `<prepared_dir>/.file-hashes.json` under (path, size, mtime_ns,
inode), so an unchanged file is not read again; the fingerprint itself depends only on content,
so every node computes the same folder name for the same files.

Building a folder under a lock, so that one process writes it: cap_prep/lock.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path

from cap_common.errors import CapError
from cap_prep.shards import FORMAT_VERSION, MANIFEST
from cap_prep.sources import InputFile

HASH_CACHE = ".file-hashes.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


# ---------------------------------------------------------------- fingerprint
def prep_keys(cfg) -> dict:
    """The config keys that change the prepared tokens (and nothing else: not lr, epochs, ...)."""

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {
        "sequence_len": cfg.sequence_len,
        "sequence_prefix": plain(cfg.sequence_prefix),
        "mask_tokens": plain(cfg.mask_tokens),
        "drop_tails": cfg.drop_tails,
        "mix_datasets": cfg.mix_datasets,
        "max_sequences": cfg.max_sequences,
        "eval_fraction": cfg.eval_fraction,
        "seed": cfg.seed,
        "add_prefix_space": cfg.add_prefix_space,
        "datasets": [_dataset_keys(cfg, d, plain) for d in cfg.datasets],
        **_chat_keys(cfg),
    }


def _chat_keys(cfg) -> dict:
    """The conversation keys, only when set (a template file by its content), so earlier configs keep
    their fingerprint."""
    keys = {}
    if cfg.chat_template is not None:
        keys["chat_template"] = sha256_file(cfg.chat_template)
    if tuple(cfg.train_roles) != ("assistant",):
        keys["train_roles"] = list(cfg.train_roles)
    if cfg.document_attention is not None:
        keys["document_attention"] = cfg.document_attention
    return keys


def _dataset_keys(cfg, d, plain) -> dict:
    """A dataset's prep keys; the later ones only when set (drop_tails: when it differs from the top-level
    one), so earlier configs keep their fingerprint."""
    keys = {"control_class": d.control_class, "document_suffix": plain(d.document_suffix)}
    for name in ("document_prefix", "max_tokens", "train_roles"):
        if getattr(d, name) is not None:
            keys[name] = plain(getattr(d, name))
    if d.format != "auto":
        keys["format"] = d.format
    if d.fields:
        keys["fields"] = dict(d.fields)
    if cfg.drops_tails(d) != cfg.drop_tails:
        keys["drop_tails"] = cfg.drops_tails(d)
    return keys


def sha256_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise CapError(f"{path}: cannot read ({e.strerror})") from None


def tokenizer_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of each tokenizer file present in model_dir."""
    return {name: sha256_file(model_dir / name) for name in TOKENIZER_FILES if (model_dir / name).is_file()}


class FileHashes:
    """Content hashes of input files, remembered across runs by (path, size, mtime_ns, inode)."""

    def __init__(self, root: Path):
        self.path = root / HASH_CACHE
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def digest(self, f: InputFile) -> str:
        stamp = [f.size, f.mtime_ns, f.inode]
        entry = self.known.get(str(f.path))
        if entry and entry[:3] == stamp:
            return entry[3]
        digest = sha256_file(f.path)
        self.known[str(f.path)] = stamp + [digest]
        self.changed = True
        return digest

    def save(self) -> None:
        """Merge into the file on disk (best effort: it is only a cache)."""
        if not self.changed or not self.path.parent.is_dir():
            return
        try:
            on_disk = json.loads(self.path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk.update(self.known)
        tmp = self.path.with_name(f"{HASH_CACHE}.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            tmp.write_text(json.dumps(on_disk))
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()


def fingerprint(cfg, inputs: list[list[InputFile]], hashes: FileHashes, paths: bool = True) -> str:
    """The folder name of the prepared dataset for `cfg` and its matched input files.

    paths=False leaves the files' paths out: the identity of the data itself, which a moved copy
    of the same files keeps (cap-train compares it on resume)."""

    def entry(f: InputFile) -> list:
        return [str(f.path), f.size, hashes.digest(f)] if paths else [f.size, hashes.digest(f)]

    record = {
        "format_version": FORMAT_VERSION,
        "prep": prep_keys(cfg),
        "tokenizer": tokenizer_hashes(cfg.model_dir),
        "inputs": [[entry(f) for f in files] for files in inputs],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def is_complete(folder: Path) -> bool:
    """True for a published folder of this format: manifest written (last) and every shard at its size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            return False
        shards = [s for split in manifest["splits"].values() for s in split["shards"]]
        return all((folder / s["file"]).stat().st_size == s["bytes"] for s in shards)
    except (OSError, ValueError, KeyError, TypeError):
        return False
