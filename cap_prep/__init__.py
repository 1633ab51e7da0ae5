"""cap-prep: tokenize and pack datasets into memory-mappable Arrow shards (docs/formats.md, section 2).

What cap-train uses:
    prepare(cfg, force=False, quiet=False) -> Path    build or reuse; returns the prepared folder
    dataset_folder(cfg) -> Path                        that folder's path, without building
    open_split(folder, "train" | "eval") -> Split      zero-copy memory-mapped rows
    load_manifest(folder) -> dict

Modules: sources (input files, streamed), tokenize (tokenizer and document tokens), windows (long
documents tokenized in windows, exactly), pack (sequences), shards (Arrow files, manifest, readers),
cache (fingerprint, lock, atomic publish), build (the pipeline), report (summary table), cli (the command).
"""

from cap_prep.build import dataset_folder, prepare
from cap_prep.shards import Split, load_manifest, open_split

__all__ = ["Split", "dataset_folder", "load_manifest", "open_split", "prepare"]
