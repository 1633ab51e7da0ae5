"""cap's import names never take another distribution's: `common/` and `kernels/` install as
`cap_common` and `cap_kernels` (setup.cfg's package_dir), and neither folder is a regular package,
so from the repository root a real `kernels` or `common` elsewhere on the path still wins."""

from __future__ import annotations

import configparser
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDER_OF = {"cap_common": "common", "cap_kernels": "kernels"}

# A stand-in for Hugging Face's `kernels` distribution: module, version metadata, get_kernel.
STANDIN_INIT = '''
__version__ = "0.18.2"
STANDIN = True

def get_kernel(repo_id, version=None):
    class Kernel:
        gemm_4bit_forward = staticmethod(lambda *a, **k: "stand-in")
    return Kernel
'''

PROBE = textwrap.dedent('''
    import importlib, sys
    where = sys.argv[1]
    if where == "after":
        sys.path.append(sys.argv[2])
    elif where == "before":
        sys.path.insert(0, sys.argv[2])
    import bitsandbytes  # imports its CPU backend, which asks for `kernels` on AVX512-BF16 CPUs
    import transformers.utils.import_utils as iu
    from cap_train.loss import PipelineLoss  # noqa: F401 - cap's loss pulls in cap_kernels
    import cap_kernels.fused_linear_ce as fl
    print("CAP_KERNELS", fl.__file__)
    if where == "none":
        try:
            from kernels import get_kernel  # what bitsandbytes runs
        except ImportError as e:
            print("NO_KERNELS", e)
        try:
            import common
            print("COMMON", getattr(common, "__file__", None))
        except ImportError as e:
            print("NO_COMMON", e)
    else:
        from kernels import get_kernel  # what bitsandbytes runs
        import kernels
        print("STANDIN", getattr(kernels, "STANDIN", False), get_kernel("x", version=1).gemm_4bit_forward())
        print("TRANSFORMERS_SEES", iu.is_kernels_available())
''')


def test_setup_cfg_lists_every_package():
    """setup.cfg lists packages by hand (find: cannot map names); every folder with an __init__.py is
    there, and the two mapped top-level folders have none (a regular package there would shadow)."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    assert mapping == FOLDER_OF
    found = set()
    for init in REPO.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(REPO).parts
        if rel[0] in ("cap_prep", "cap_train", "cap_export", "common", "kernels"):
            top = {v: k for k, v in FOLDER_OF.items()}.get(rel[0], rel[0])
            found.add(".".join((top, *rel[1:])))
    assert found | set(FOLDER_OF) == listed
    assert not (REPO / "common" / "__init__.py").exists() and not (REPO / "kernels" / "__init__.py").exists()


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standin")
    (root / "kernels").mkdir()
    (root / "kernels" / "__init__.py").write_text(STANDIN_INIT)
    info = root / "kernels-0.18.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.2\n")
    (info / "top_level.txt").write_text("kernels\n")
    return root


def probe(where: str, cwd: Path, standin: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, where, str(standin)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_a_real_kernels_package_wins_everywhere(tmp_path, standin, where, cwd):
    out = probe(where, REPO if cwd == "repo" else tmp_path, standin)
    assert "STANDIN True stand-in" in out, out
    assert "TRANSFORMERS_SEES True" in out, out
    assert f"CAP_KERNELS {REPO / 'kernels' / 'fused_linear_ce.py'}" in out, out


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_without_it_nothing_names_a_cap_file(tmp_path, standin, cwd):
    """No `kernels` installed: bitsandbytes' import fails as for any user without it, and no message
    points at a cap folder; `common` is not importable from outside the repository."""
    out = probe("none", REPO if cwd == "repo" else tmp_path, standin)
    assert "NO_KERNELS" in out and str(REPO) not in out.replace(f"CAP_KERNELS {REPO}", ""), out
    assert ("NO_COMMON" in out) if cwd == "elsewhere" else ("COMMON None" in out), out
