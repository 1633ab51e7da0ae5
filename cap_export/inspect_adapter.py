"""`cap-export inspect`: per-layer norms and spectra of a trained adapter, to choose layers and ranks.

For each layer of a Control Adapter the matrix is W' = W'₊ = U·V (class +1, `Control.factors`);
for each module of a PEFT LoRA it is ΔW = s·B·A (s = PEFT's scaling of that module). From the
factors alone (QR of U and Vᵀ, SVD of the k×k core: `factors.singular_values`; never a dense
matrix) come its singular values σ₁ ≥ … ≥ σ_k, and

    ‖W‖_F = √(Σ σᵢ²)        ‖W‖₂ = σ₁
    erank = exp(H(p)),  H(p) = −Σ pᵢ·ln pᵢ,  pᵢ = σᵢ / Σσ   (entropy effective rank, Roy & Vetterli 2007)
    rank>1% = #{i : σᵢ > 0.01·σ₁}

erank is 1 for a rank-1 matrix and k for k equal singular values; an all-zero matrix (an untrained
adapter) has erank 0. The summary's total is the Frobenius norm of all layers together,
√(Σ_layers ‖W‖_F²). `inspect` returns a `Report` (table lines, JSON document); `write_plot` draws
‖W‖_F and ‖W‖₂ by layer.
Slightly over 300 lines: one analysis with its three outputs (table, JSON, plot) kept together.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from cap_common.adapters import factors
from cap_common.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from cap_common.errors import CapError
from cap_export.folders import PROVENANCE, adapter_folder, named_folder

THRESHOLD = 0.01  # rank>1%: singular values above this fraction of σ₁
ERANK = "erank = exp(H(p)), p = σ/Σσ (entropy effective rank)"
COUNT = f"rank>1% = number of σ > {THRESHOLD:g}·σ_max"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.\d+\.")


@dataclass
class Row:
    """One layer (Control Adapter) or one module (LoRA)."""

    name: str  # "layer 3" or the module's checkpoint name, e.g. model.layers.3.mlp.down_proj
    layer: int | None
    shape: list[int]  # [out, in] of the matrix
    rank: int  # k, the rank of the factors (σ has k entries)
    frobenius: float
    spectral: float
    singular_values: list[float]  # the leading `top`, descending
    effective_rank: float
    rank_above_1pct: int


@dataclass
class Report:
    kind: str  # "control" or "lora"
    adapter: str
    info: dict  # adapter_type, target, hidden_size, rank, alpha, scale / multiplicative, modules
    top: int
    rows: list[Row] = field(default_factory=list)

    @property
    def matrix(self) -> str:
        return "W'" if self.kind == "control" else "ΔW"

    def summary(self) -> dict:
        rows = self.rows
        largest = max(rows, key=lambda r: r.frobenius)
        sharpest = max(rows, key=lambda r: r.spectral)
        eranks = [r.effective_rank for r in rows]
        return {
            "rows": len(rows),
            "layers": len({r.layer for r in rows}),
            "largest_frobenius": {"value": largest.frobenius, "at": largest.name},
            "largest_spectral": {"value": sharpest.spectral, "at": sharpest.name},
            "total_frobenius": math.sqrt(sum(r.frobenius**2 for r in rows)),
            "effective_rank": {"mean": sum(eranks) / len(eranks), "min": min(eranks), "max": max(eranks)},
        }

    def to_json(self) -> dict:
        return {
            "adapter": self.adapter,
            "kind": self.kind,
            **self.info,
            "matrix": "W' = W'+ (class +1)" if self.kind == "control" else "s·B·A",
            "top": self.top,
            "effective_rank": ERANK,
            "rank_above_1pct": COUNT,
            "rows": [asdict(r) for r in self.rows],
            "summary": self.summary(),
        }

    def header(self) -> str:
        i = self.info
        if self.kind == "control":
            scale = "" if i["adapter_type"] == "spectral" else f", alpha {i['alpha']:g}, scale {i['scale']:g}"
            return (
                f"{i['adapter_type']} Control Adapter on '{i['target']}' in {self.adapter}: "
                f"W' = W'₊ (class +1), {len(self.rows)} layers, hidden {i['hidden_size']}, "
                f"rank {i['rank']} (k = {i['factor_rank']}){scale}"
            )
        kind = "multiplicative" if i["multiplicative"] else "additive"
        return (
            f"{kind} PEFT LoRA in {self.adapter}: ΔW = s·B·A, {len(self.rows)} modules on "
            f"{self.summary()['layers']} layers, rank {i['rank']}, alpha {i['alpha']:g}"
        )

    def table(self) -> list[str]:
        """Header, legend, column titles, one line per row, summary."""
        m = self.matrix
        shown = max(len(r.singular_values) for r in self.rows)
        name_width = max(len("layer" if self.kind == "control" else "module"), *(len(_short(r)) for r in self.rows))
        titles = [f"‖{m}‖_F", f"‖{m}‖₂", "erank", "rank>1%"] + [f"σ{i + 1}" for i in range(shown)]
        head = f"{'layer' if self.kind == 'control' else 'module':<{name_width}}" + "".join(f"{t:>10}" for t in titles)
        lines = [
            self.header(),
            f"  {ERANK}; {COUNT}; σ1…σ{shown}: leading singular values",
            head,
        ]
        for r in self.rows:
            values = [f"{r.frobenius:10.4g}", f"{r.spectral:10.4g}", f"{r.effective_rank:10.2f}"]
            values.append(f"{r.rank_above_1pct:10d}")
            values += [f"{s:10.4g}" for s in r.singular_values]
            lines.append(f"{_short(r):<{name_width}}" + "".join(values))
        s = self.summary()
        what = f"{s['rows']} layers" if self.kind == "control" else f"{s['rows']} modules on {s['layers']} layers"
        e = s["effective_rank"]
        lines.append(
            f"summary: {what}; largest ‖{m}‖_F {s['largest_frobenius']['value']:.4g} at "
            f"{s['largest_frobenius']['at']}; largest ‖{m}‖₂ {s['largest_spectral']['value']:.4g} at "
            f"{s['largest_spectral']['at']}; total ‖{m}‖_F {s['total_frobenius']:.4g} (√Σ of squares); "
            f"erank mean {e['mean']:.2f} [{e['min']:.2f}, {e['max']:.2f}]"
        )
        return lines


def _short(row: Row) -> str:
    return str(row.layer) if row.name.startswith("layer ") else row.name


def measure(U: torch.Tensor, V: torch.Tensor, top: int) -> dict:
    """Norms, leading singular values and effective ranks of U·V, from the factors (float64)."""
    sigma = factors.singular_values(U.double(), V.double())
    total = sigma.sum()
    if total > 0:
        p = sigma[sigma > 0] / total
        erank = float(torch.exp(-(p * p.log()).sum()))
    else:
        erank = 0.0
    spectral = float(sigma[0]) if sigma.numel() else 0.0
    return {
        "rank": sigma.numel(),
        "frobenius": float(sigma.square().sum().sqrt()),
        "spectral": spectral,
        "singular_values": [float(s) for s in sigma[:top]],
        "effective_rank": erank,
        "rank_above_1pct": int((sigma > THRESHOLD * spectral).sum()) if spectral > 0 else 0,
    }


def inspect(path, top: int = 8) -> Report:
    """The report of the Control Adapter or PEFT LoRA at `path` (epoch<N>/, adapter or checkpoint folder)."""
    if top < 1:
        raise CapError(f"--top {top}: must be at least 1")
    from cap_export.adapters import load_any

    folder = adapter_folder(path)
    with _one_thread():
        return _inspect(named_folder(folder), load_any(folder), top)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread meanwhile: the work is many small QRs, which gain little from threads, and
    on a busy machine OpenMP's waiting made them several times slower (benchmarks/bench_inspect.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _inspect(folder: Path, adapter, top: int) -> Report:
    from cap_export.adapters import Control

    rows = []
    if isinstance(adapter, Control):
        for layer in adapter.layers:
            U, V = adapter.factors(layer)
            rows.append(Row(f"layer {layer}", layer, [U.shape[0], V.shape[1]], **measure(U, V, top)))
        info = {
            "adapter_type": adapter.adapter_type,
            "target": adapter.target,
            "hidden_size": adapter.hidden_size,
            "rank": adapter.rank,
            "factor_rank": rows[0].rank,
            "alpha": adapter.alpha,
            "scale": adapter.scale,
        }
        return Report("control", str(folder), info, top, rows)
    for name in sorted(adapter.pairs, key=_module_order):
        A, B = adapter.pairs[name]
        U, V = adapter.scale(name) * B.double(), A.double()
        m = _LAYER.search(name)
        rows.append(Row(name, int(m.group(1)) if m else None, [U.shape[0], V.shape[1]], **measure(U, V, top)))
    ranks = sorted({A.shape[0] for A, _ in adapter.pairs.values()})
    alpha = adapter.config.get("lora_alpha")
    info = {
        "multiplicative": adapter.marked_multiplicative,
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": float(alpha if alpha is not None else ranks[0]),
        "modules": len(adapter.pairs),
    }
    return Report("lora", str(folder), info, top, rows)


def _module_order(name: str) -> tuple:
    m = _LAYER.search(name)
    return (int(m.group(1)) if m else -1, name)


def _module_kind(name: str) -> str:
    """model.layers.3.block_sparse_moe.experts.5.w2 → block_sparse_moe.experts.*.w2"""
    m = _LAYER.search(name)
    rest = name[m.end() :] if m else name
    return _EXPERT.sub(".*.", rest)


def plot_available() -> None:
    """Raise a one-line CapError when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CapError("--plot needs matplotlib, which is not installed (pip install 'cap[demo]')") from None


def _own_files(folder: Path) -> dict:
    names = (WEIGHTS_NAME, "adapter_model.bin", CONFIG_NAME, PROVENANCE)
    return {f"ADAPTER's {name}": folder / name for name in names}


def check_plot(png, path) -> None:
    """Refuse a --plot path that is a folder or one of the adapter's own files, before any work."""
    from cap_export.staging import check_output

    png, own = Path(png), _own_files(adapter_folder(path))
    if png.is_dir():
        raise CapError(f"--plot {png}: is a folder; give the path of a .png file")
    if any(png.resolve() == p.resolve() for p in own.values()):
        raise CapError(f"--plot {png}: is one of the adapter's own files; choose another path")
    check_output(png, True, is_file=True, inputs=own)


def write_plot(report: Report, png: Path) -> None:
    """‖W‖_F (top) and ‖W‖₂ (bottom) by layer as a PNG at `png`, written whole or not at all
    (staged beside it); an existing file is replaced, a folder or the adapter's own files are refused.
    LoRA: one line per module kind (expert indices collapsed, the largest value of each layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from cap_export.staging import staged_output

    series: dict[str, dict[int, tuple[float, float]]] = {}
    for r in report.rows:
        kind = "W'" if report.kind == "control" else _module_kind(r.name)
        layer = r.layer if r.layer is not None else -1
        old = series.setdefault(kind, {}).get(layer, (0.0, 0.0))
        series[kind][layer] = (max(old[0], r.frobenius), max(old[1], r.spectral))
    m = report.matrix
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for kind, by_layer in series.items():
        layers = sorted(by_layer)
        axes[0].plot(layers, [by_layer[i][0] for i in layers], marker="o", markersize=3, label=kind)
        axes[1].plot(layers, [by_layer[i][1] for i in layers], marker="o", markersize=3, label=kind)
    axes[0].set_ylabel(f"‖{m}‖_F (Frobenius)")
    axes[1].set_ylabel(f"‖{m}‖₂ (spectral)")
    axes[1].set_xlabel("layer")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    if report.kind == "lora":
        axes[0].legend(fontsize="small", ncol=max(1, len(series) // 8 + 1))
    fig.suptitle(report.header(), fontsize="small", wrap=True)
    fig.tight_layout()
    try:
        with staged_output(png, True, is_file=True, inputs=_own_files(Path(report.adapter))) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
