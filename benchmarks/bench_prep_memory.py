"""cap-prep's peak memory (RSS) and time on large inputs, each run as the real command.

    python -m benchmarks.bench_prep_memory [--size 1G] [--single 200M] [--formats txt,json,jsonl]
                                           [--only many|single] [--tokenizer PATH] [--keep DIR] [--code DIR]

For each format it generates
- "many": `--size` bytes of English-like documents (about 10 kB each; `.txt`: one document per
  file, 0.1-1 MB each; `.json`: one file holding a list; `.jsonl`: one file), and
- "single": one document of `--single` bytes (`.txt`: one file; `.json`: `[{"text": ...}]`;
  `.jsonl`: one line),
then runs `python -m cap_prep.cli cfg.toml` in a subprocess (from `--code`, to compare with another
checkout) and prints its peak RSS (its own ru_maxrss: `run_measured`) and wall time, with the
tokens and sequences it wrote. The text has paragraphs, indented lines, long space runs and some
non-ASCII words and emoji. The tokenizer is the tests' tiny byte-level BPE unless --tokenizer
names a folder with a tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_prep import model_folder

REPO = Path(__file__).resolve().parents[1]
UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def size(text: str) -> int:
    """'1G', '200M', '30M', '5000' -> bytes (decimal units)."""
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text and text[-1] in UNITS else ""
    return int(float(text[: len(text) - len(unit)]) * UNITS[unit])


class Text:
    """Deterministic English-like text: sentences, paragraphs, indentation, space runs, unicode."""

    def __init__(self, seed: int = 0):
        from tests.assets import sample_text

        self.rng = np.random.default_rng(seed)
        lines = sample_text(4000, seed=seed)
        lines += ["Café naïve façade — “quoted” 日本語のテキスト, ελληνικά, emoji 🙂🚀."] * 40
        lines += ["    indented   line\twith tabs", "Spaces" + " " * 300 + "end."] * 20
        self.lines = np.array(lines, dtype=object)

    def document(self, approx_chars: int) -> str:
        n = max(1, approx_chars // 48)
        picks = self.lines[self.rng.integers(0, len(self.lines), n)]
        breaks = self.rng.choice(np.array([" ", " ", " ", "\n", "\n\n"], dtype=object), n)
        return "".join(a + b for a, b in zip(picks, breaks))


def write_many(folder: Path, fmt: str, total: int, text: Text) -> None:
    folder.mkdir(parents=True)
    written, k = 0, 0
    if fmt == "txt":
        while written < total:
            doc = text.document(int(text.rng.integers(100_000, 1_000_000)))
            written += (folder / f"doc-{k:06d}.txt").write_text(doc)
            k += 1
        return
    with open(folder / f"data.{fmt}", "w") as f:
        f.write("[\n" if fmt == "json" else "")
        while written < total:
            line = json.dumps({"text": text.document(int(text.rng.integers(1_000, 20_000))), "id": k})
            f.write((",\n" if fmt == "json" and k else "") + line + ("" if fmt == "json" else "\n"))
            written += len(line) + 2
            k += 1
        f.write("\n]\n" if fmt == "json" else "")


def write_single(folder: Path, fmt: str, total: int, text: Text) -> None:
    folder.mkdir(parents=True)
    doc = "".join(text.document(1_000_000) for _ in range(max(1, total // 1_000_000)))
    if fmt == "txt":
        (folder / "doc.txt").write_text(doc)
    elif fmt == "json":
        (folder / "doc.json").write_text(json.dumps([{"text": doc}]))
    else:
        (folder / "doc.jsonl").write_text(json.dumps({"text": doc}) + "\n")


# Run as `python -c _FORKER PEAK_FILE CMD...`: forks CMD and writes its ru_maxrss (KiB) to PEAK_FILE.
_FORKER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def run_measured(cmd: list[str], **popen) -> tuple[int, float]:
    """Run `cmd` (subprocess.run keywords) and return (exit code, its peak RSS in MB).

    Linux's ru_maxrss of a process started from this one includes this process's own peak (exec
    keeps the high-water mark of the memory it replaces, and subprocess shares ours until then),
    so the command is forked from a small Python process, which reports the wait4 rusage.
    """
    with tempfile.NamedTemporaryFile("r") as peak:
        code = subprocess.run([sys.executable, "-c", _FORKER, peak.name, *cmd], **popen).returncode
        return code, int(peak.read() or 0) / 1024


def run_prep(
    work: Path, name: str, data: Path, model: Path, sequence_len: int, code: Path = REPO, keep: bool = False
) -> dict:
    out = work / ("out" if code == REPO else f"out-{code.name}") / name  # separate caches per checkout
    cfg = out.parent / f"{name}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(
        f'model_dir = "{model}"\noutput_dir = "{out}"\nlr = 1e-4\nlora_rank = 1\n'
        f'sequence_len = {sequence_len}\neval_fraction = 0.01\n'
        f'[[datasets]]\ndataset_path = "{data}/*"\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(code), str(REPO)]))}
    with open(cfg.with_suffix(".out"), "w+") as stdout_file, open(cfg.with_suffix(".err"), "w+") as err:
        t0 = time.perf_counter()
        returncode, peak_mb = run_measured(
            [sys.executable, "-m", "cap_prep.cli", str(cfg)], cwd=code, env=env, stdout=stdout_file, stderr=err
        )
        elapsed = time.perf_counter() - t0
        stdout_file.seek(0)
        err.seek(0)
        stdout, stderr = stdout_file.read(), err.read()
    result = {
        "name": name,
        "input_mb": sum(p.stat().st_size for p in data.iterdir()) / 1e6,
        "seconds": elapsed,
        "rc": returncode,
        "peak_rss_mb": peak_mb,
    }
    if returncode == 0:
        folder = Path(stdout.strip().splitlines()[-1])
        m = json.loads((folder / "manifest.json").read_text())
        result["tokens"] = sum(d[s]["tokens"] for d in m["datasets"] for s in ("train", "eval"))
        result["sequences"] = sum(m["splits"][s]["sequences"] for s in ("train", "eval"))
        result["folder"] = folder
        if not keep:
            shutil.rmtree(folder.parent)
    else:
        result["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="bytes of many documents per format (default 1G)")
    ap.add_argument("--single", default="200M", help="bytes of the one-document inputs (default 200M)")
    ap.add_argument("--formats", default="txt,json,jsonl")
    ap.add_argument("--only", choices=("many", "single"), default=None)
    ap.add_argument("--tokenizer", default=None, help="folder with a fast tokenizer (default: the tests' tiny one)")
    ap.add_argument("--sequence-len", type=int, default=2048)
    ap.add_argument(
        "--keep",
        default=None,
        help="work folder to keep, with the inputs and the prepared folders (default: a temp folder, removed)",
    )
    ap.add_argument(
        "--code",
        default=str(REPO),
        help="folder whose cap_prep package to run (e.g. an older checkout, to compare); default: this one",
    )
    args = ap.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-prep-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = model_folder(work, args.tokenizer) if not (work / "model").exists() else work / "model"
        print(
            f"cpu: {os.cpu_count()} cores; python {sys.version.split()[0]}; "
            f"tokenizer: {args.tokenizer or 'tests/assets tiny BPE'}; sequence_len {args.sequence_len}",
            flush=True,
        )
        jobs = []
        for fmt in args.formats.split(","):
            if args.only in (None, "many"):
                jobs.append((f"many-{fmt}", write_many, fmt, size(args.size)))
            if args.only in (None, "single"):
                jobs.append((f"single-{fmt}", write_single, fmt, size(args.single)))
        for name, write, fmt, nbytes in jobs:
            data = work / "data" / name
            if not data.exists():
                t0 = time.perf_counter()
                write(data, fmt, nbytes, Text(seed=len(name)))
                print(f"{name}: generated in {time.perf_counter() - t0:.0f} s", flush=True)
            r = run_prep(work, name, data, model, args.sequence_len, Path(args.code).resolve(), args.keep is not None)
            line = (
                f"{name:14s} input {r['input_mb']:8.1f} MB  peak RSS {r['peak_rss_mb']:8.1f} MB  "
                f"time {r['seconds']:7.1f} s"
            )
            if r["rc"] == 0:
                line += f"  tokens {r['tokens']:,}  sequences {r['sequences']:,}"
            else:
                line += f"  FAILED rc={r['rc']}: {r['error']}"
            print(line, flush=True)
            if args.keep is None:
                shutil.rmtree(data)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
