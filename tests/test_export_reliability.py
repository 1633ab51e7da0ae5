"""cap-export as a user meets its failures, through the real CLI: an OUT that would destroy an input,
NaN / Inf in adapters, base weights and results, SIGTERM / Ctrl-C and the temporaries they leave, a
full disk, malformed configs and other bad input (one line, exit code 2, never a traceback), and
output permissions that follow the umask."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cap_common.adapters.io import lora_key, save_adapter
from cap_common.files import HOST
from cap_export.cli import main
from tests.test_export_support import save_control, single_thread  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "adapter_model.safetensors"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result, *words) -> str:
    """Exit code 2 and exactly one `cap-export: error:` line, holding every word."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("cap-export: error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert str(word) in lines[0], lines[0]
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _interruptible() -> None:
    """In the child before exec: Ctrl-C acts as in a terminal, also when the suite itself was started
    in the background (a shell starts background jobs with SIGINT ignored, and that is inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env=None, before=None) -> subprocess.Popen:
    """`python -m cap_export.cli ARGS` in a child process (stdout and stderr captured); `before`
    runs in the child before exec."""

    def prepare():
        _interruptible()
        if before:
            before()

    return subprocess.Popen(
        [sys.executable, "-m", "cap_export.cli", *map(str, args)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=prepare,
    )


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def base(tmp_path, tiny_model_dir) -> Path:
    """A private copy of the tiny llama model (tests may break it)."""
    return Path(shutil.copytree(tiny_model_dir("llama"), tmp_path / "base"))


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_control(tmp_path / "ckpt", "full")


@pytest.fixture
def lora(tmp_path, base, ckpt) -> Path:
    assert run("additive", base, ckpt, tmp_path / "lora").exit_code == 0
    return tmp_path / "lora"


def set_value(path: Path, key_part: str, value: float, scale: float | None = None) -> str:
    """In a safetensors file, put `value` into the first element of the first tensor whose key holds
    `key_part` (or multiply the whole tensor by `scale`); returns that key."""
    tensors = load_file(path)
    key = next(k for k in tensors if key_part in k)
    if scale is not None:
        tensors[key] = tensors[key] * scale
    else:
        tensors[key].view(-1)[0] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return key


# ---------------------------------------------------------------- 1. OUT never destroys an input
def test_merge_into_base_with_force_keeps_base(tmp_path, base, lora):
    before, lora_before = digests(base), digests(lora)
    for out in (base, base / ".." / "base"):
        one_error_line(run("merge", base, lora, out, "--force"), out, "is the input BASE")
    (tmp_path / "link").symlink_to(base)
    one_error_line(run("merge", base, lora, tmp_path / "link", "--force"), "is the input BASE")
    one_error_line(run("merge", base, lora, tmp_path, "--force"), "contains the input BASE")
    one_error_line(run("merge", base, lora, lora / "merged", "--force"), "lies inside the input LORA")
    one_error_line(run("merge", base, lora, lora, "--force"), "is the input LORA")
    assert digests(base) == before and digests(lora) == lora_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ckpt", "link", "lora"]


def test_exports_refuse_an_out_among_their_inputs(tmp_path, base, ckpt, lora):
    config = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    ckpt_before, lora_before, base_before = digests(ckpt), digests(lora), digests(base)
    one_error_line(run("multiplicative", ckpt, base, "--force"), "is the input BASE recorded in CKPT")
    for command in (("additive", base), ("multiplicative",)):
        one_error_line(run(*command, ckpt, ckpt, "--force"), "is the input CKPT")
        one_error_line(run(*command, ckpt, ckpt / "out"), "lies inside the input CKPT")
        one_error_line(run(*command, ckpt, tmp_path, "--force"), "contains the input")
    one_error_line(run("additive", base, ckpt, base, "--force"), "is the input BASE")
    one_error_line(run("multiplicative", ckpt, base / "lora", "--base", base), "lies inside the input --base")
    one_error_line(run("gguf", lora, lora / "a.gguf", "--base", base), "lies inside the input LORA")
    one_error_line(run("gguf", lora, base / "a.gguf", "--base", base, "--force"), "lies inside the input --base")
    one_error_line(run("gguf", lora, lora, "--base", base, "--force"), "is the input LORA")
    assert (digests(ckpt), digests(lora), digests(base)) == (ckpt_before, lora_before, base_before)


# ---------------------------------------------------------------- 2. non-finite values
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_lora_with_nan_or_inf_is_refused(tmp_path, base, lora, value):
    key = set_value(lora / WEIGHTS, "lora_B", value)
    line = one_error_line(run("merge", base, lora, tmp_path / "merged"), lora / WEIGHTS, key)
    assert ("1 NaN" if math.isnan(value) else "1 ±Inf") in line
    one_error_line(run("gguf", lora, tmp_path / "a.gguf", "--base", base), lora / WEIGHTS, key)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "a.gguf").exists()
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("command", ["additive", "multiplicative"])
def test_control_adapter_with_nan_is_refused(tmp_path, base, ckpt, command):
    key = set_value(ckpt / WEIGHTS, "control_B", math.nan)
    args = ("additive", base, ckpt) if command == "additive" else ("multiplicative", ckpt)
    one_error_line(run(*args, tmp_path / "out"), ckpt / WEIGHTS, key, "NaN")
    assert not (tmp_path / "out").exists() and temporaries(tmp_path) == []


def test_float16_overflow_is_refused(tmp_path, base, ckpt):
    set_value(ckpt / WEIGHTS, "layers.1.control_A", 0, scale=1e7)  # V·M ≈ 1e6 > 65504
    line = one_error_line(run("additive", base, ckpt, tmp_path / "out", "--dtype", "float16"), ckpt, "float16", "±Inf")
    assert "lora_A" in line and not (tmp_path / "out").exists() and temporaries(tmp_path) == []
    assert run("additive", base, ckpt, tmp_path / "out", "--dtype", "float32").exit_code == 0  # it was only the cast


def test_merge_refuses_a_base_with_nan_in_a_touched_weight(tmp_path, base, lora):
    key = set_value(base / "model.safetensors", "layers.1.self_attn.o_proj.weight", math.nan)
    one_error_line(run("merge", base, lora, tmp_path / "merged"), base / "model.safetensors", key, "NaN")
    assert not (tmp_path / "merged").exists() and temporaries(tmp_path) == []


def test_verify_fails_on_nan_logits(tmp_path, base, ckpt, lora):
    assert run("merge", base, lora, tmp_path / "merged").exit_code == 0
    set_value(tmp_path / "merged" / "model.safetensors", "layers.1.mlp.down_proj.weight", math.nan)
    r = run("verify", base, ckpt, tmp_path / "merged")
    assert r.exit_code == 1, r.output
    assert "max |Δlogit| = nan" in r.output and "NOT FINITE: the exported model's logits" in r.output, r.output
    assert not re.search(r"^\s*OK", r.output, re.M), r.output


# ---------------------------------------------------------------- 3. signals and stale temporaries
def wait_for(condition, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def big_sharded_base(folder: Path, small: Path, extra_mib: int = 96) -> Path:
    """`small`'s tensors in shard 1 and a large extra tensor (sparse, all zeros) in shard 2: a merge
    spends a while copying shard 2."""
    folder.mkdir()
    for path in small.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, folder / path.name)
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    shutil.copy(small / "model.safetensors", folder / shards[0])
    n = extra_mib << 20
    header = json.dumps({"extra.weight": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / shards[1], "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + n)
    weight_map = {key: shards[0] for key in load_file(small / "model.safetensors")} | {"extra.weight": shards[1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_merge_leaves_nothing(tmp_path, base, lora, signum, code):
    big = big_sharded_base(tmp_path / "big", base)
    out = tmp_path / "merged"
    child = cli("merge", big, lora, out)

    def copying_shard_2():
        return any((tmp / "model-00002-of-00002.safetensors").exists() for tmp in tmp_path.glob(".merged.tmp-*"))

    wait_for(copying_shard_2, child)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert not out.exists() and temporaries(tmp_path) == []


def test_sigterm_during_verify_removes_its_temporary_folder(tmp_path, base, ckpt):
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    child = cli("verify", base, ckpt, env={"TMPDIR": str(scratch)})
    wait_for(lambda: temporaries(scratch) != [], child)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr
    assert temporaries(scratch) == []


@pytest.mark.parametrize("interruption,code", [(SystemExit(143), 143), (KeyboardInterrupt(), 130)])
def test_interrupted_gguf_leaves_no_part_file(tmp_path, base, lora, monkeypatch, interruption, code):
    """What the SIGTERM handler (SystemExit) and Ctrl-C raise, in the middle of writing the file."""
    from cap_export import gguf_export

    def interrupted(lora_, base_, path, outtype="f32", progress=True):
        Path(path).write_bytes(b"GGUF part")
        raise interruption

    monkeypatch.setattr(gguf_export, "export_gguf", interrupted)
    (tmp_path / "a.gguf").write_bytes(b"old")
    r = CliRunner().invoke(main, ["gguf", str(lora), str(tmp_path / "a.gguf"), "--base", str(base), "--force"])
    assert r.exit_code == code, r.output
    assert (tmp_path / "a.gguf").read_bytes() == b"old" and temporaries(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, base, ckpt, lora, monkeypatch):
    dead, alive = dead_pid(), os.getpid()
    stale = [tmp_path / f".out.tmp-{HOST}-{dead}-deadbeef", tmp_path / f".merged.tmp-{HOST}-{dead}-00c0ffee"]
    kept = [tmp_path / f".out.tmp-{HOST}-{alive}-cafe0000", tmp_path / f".out.tmp-elsewhere-{dead}-0badf00d"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / WEIGHTS).write_bytes(b"part")
    r = run("additive", base, ckpt, tmp_path / "out")
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if "left by killed runs" in line]
    assert len(notes) == 1 and stale[0].name in notes[0], r.output
    assert not stale[0].exists() and all(folder.exists() for folder in kept)
    r = run("merge", base, lora, tmp_path / "merged")
    assert r.exit_code == 0 and "left by killed runs" in r.output and not stale[1].exists(), r.output
    # verify's temporary folder lives in the system temp dir, and is cleaned the same way
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sys"))
    (tmp_path / "sys").mkdir()
    (tmp_path / "sys" / f".cap-export-verify.tmp-{HOST}-{dead}-12345678").mkdir()
    r = run("verify", base, ckpt)
    assert r.exit_code == 0 and "left by killed runs" in r.output, r.output
    assert temporaries(tmp_path / "sys") == []


# ---------------------------------------------------------------- 4. OS errors while writing
def file_size_limit(n: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return limit


@pytest.mark.parametrize("command", ["merge", "additive"])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, base, ckpt, lora, command):
    out = tmp_path / "out"
    args = (base, lora, out) if command == "merge" else (base, ckpt, out)
    limit = 100_000 if command == "merge" else 4_096  # below the shard / the adapter file
    child = cli(command, *args, before=file_size_limit(limit))
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("cap-export: error:")]
    assert len(errors) == 1 and "File too large" in errors[0] and ".out.tmp-" in errors[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_one_line(tmp_path, base, ckpt):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        one_error_line(run("additive", base, ckpt, parent / "out"), parent, "Permission denied")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# ---------------------------------------------------------------- 5. malformed input: one line, never a traceback
CONFIG_CASES = [
    ("base_model_name_or_path", 5),
    ("base_model_name_or_path", ["a"]),
    ("r", "4"),
    ("r", 0),
    ("r", True),
    ("lora_alpha", "x"),
    ("target_modules", [1]),
    ("layers_to_transform", "x"),
    ("control_adapter_type", 3),
    ("control_adapter_target", ["block"]),
    ("rank_pattern", []),
    ("alpha_pattern", {"o_proj": "y"}),
    ("multiplicative", "yes"),
]


@pytest.mark.parametrize("key,value", CONFIG_CASES)
def test_adapter_config_with_wrong_types(tmp_path, base, ckpt, lora, key, value):
    for folder, args in ((ckpt, ("additive", base, ckpt)), (lora, ("merge", base, lora))):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        one_error_line(
            run(*args, tmp_path / "out"), folder / "adapter_config.json", f"{key} = {json.dumps(value)}", "expected"
        )


def test_other_bad_input_is_one_line(tmp_path, base, ckpt, lora):
    o = tmp_path / "o"

    def broken(source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, tmp_path / name))

    truncated = broken(ckpt, "truncated")
    data = (truncated / WEIGHTS).read_bytes()
    (truncated / WEIGHTS).write_bytes(data[: len(data) // 2])
    one_error_line(run("additive", base, truncated, o), truncated / WEIGHTS, "not a readable safetensors file")
    listed = broken(ckpt, "listed")
    (listed / "adapter_config.json").write_text("[1, 2]")
    one_error_line(run("multiplicative", listed, o), "expected a JSON object")

    no_config = broken(base, "no_config")
    (no_config / "config.json").unlink()
    one_error_line(run("additive", no_config, ckpt, o), no_config / "config.json")
    for name, text in (("bad_json", "{bad"), ("list_config", "[1]"), ("typed_config", None)):
        folder = broken(base, name)
        if text is None:
            text = json.dumps({**json.loads((base / "config.json").read_text()), "hidden_size": "64"})
        (folder / "config.json").write_text(text)
        one_error_line(run("merge", folder, lora, o), folder / "config.json")
        one_error_line(run("gguf", lora, tmp_path / "a.gguf", "--base", folder), folder / "config.json")

    missing_shard = broken(base, "missing_shard")
    keys = load_file(missing_shard / "model.safetensors")
    (missing_shard / "model.safetensors").unlink()
    (missing_shard / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(keys, "model-00001-of-00002.safetensors")})
    )
    for args in (("additive", missing_shard, ckpt, o), ("merge", missing_shard, lora, o)):
        one_error_line(run(*args), "model-00001-of-00002.safetensors", "does not exist")

    one_error_line(run("additive", base, ckpt, o, "--rank", 0), "--rank 0")
    one_error_line(run("multiplicative", ckpt, o, "--mixtral", 0), "--mixtral 0")
    for scale in ("nan", "inf", "-inf"):
        one_error_line(run("merge", base, lora, o, "--scale", scale), f"--scale {scale}", "finite")
    one_error_line(run("verify", base, ckpt, "--max-tokens", 0), "--max-tokens 0")
    one_error_line(run("verify", base, ckpt, "--tolerance", "nan"), "--tolerance nan")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00text\n")
    one_error_line(run("verify", base, ckpt, "--text", tmp_path / "binary.txt"), "binary.txt", "UTF-8")

    disagree = broken(lora, "disagree")
    tensors = load_file(disagree / WEIGHTS)
    key = lora_key(1, "self_attn.o_proj", "B")
    tensors[key] = torch.zeros(64, 5)
    save_file(tensors, disagree / WEIGHTS)
    for args in (("merge", base, disagree, o), ("gguf", disagree, tmp_path / "a.gguf", "--base", base)):
        one_error_line(run(*args), disagree / WEIGHTS, "do not share rank")
    rank0 = broken(lora, "rank0")
    save_file(
        {k: v[:0] if ".lora_A." in k else v[:, :0] for k, v in load_file(lora / WEIGHTS).items()}, rank0 / WEIGHTS
    )
    config = json.loads((rank0 / "adapter_config.json").read_text())
    del config["r"]
    (rank0 / "adapter_config.json").write_text(json.dumps(config))
    one_error_line(run("merge", base, rank0, o), rank0 / WEIGHTS, "rank 0")

    for name, record in (("record_json", "{bad"), ("record_types", json.dumps({"kind": "additive", "source": 5}))):
        folder = broken(lora, name)
        (folder / "cap_export.json").write_text(record)
        one_error_line(run("verify", base, folder), folder / "cap_export.json")
        one_error_line(run("merge", base, folder, o), folder / "cap_export.json")
    assert not o.exists() and not (tmp_path / "a.gguf").exists() and temporaries(tmp_path) == []


# ---------------------------------------------------------------- 6. permissions follow the umask
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, base, ckpt, mask):
    (base / "tokenizer_config.json").chmod(0o600)  # a private file of BASE: its copy follows the umask too
    previous = os.umask(mask)
    try:
        assert run("additive", base, ckpt, tmp_path / "lora").exit_code == 0
        assert run("merge", base, tmp_path / "lora", tmp_path / "merged").exit_code == 0
        assert run("gguf", tmp_path / "lora", tmp_path / "a.gguf", "--base", base).exit_code == 0
        save_adapter(tmp_path / "epoch1", {"x": torch.zeros(2)}, {"r": 1})  # as training saves epoch<N>/
    finally:
        os.umask(previous)
    folder_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    for folder in ("lora", "merged", "epoch1"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == folder_mode, folder
        for path in (tmp_path / folder).iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((tmp_path / "a.gguf").stat().st_mode) == file_mode
