"""cap-export: convert, merge, verify and GGUF-export trained adapters (see README, 'cap-export').

The command line only: each of the six commands checks its arguments, calls the modules that do
the work and reports. Over 300 lines because the commands' options, help texts and result lines
live here; the work modules are imported inside each command, so `cap-export --help` never
imports torch.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import click

from cap_common.cli import user_errors
from cap_export import PROG, note
from cap_export.peer import PeerGroup

_path = click.Path(path_type=Path)
_exists = click.Path(exists=True, path_type=Path)


def _compat(cohere: bool, mixtral: int | None, where: str = "BASE/config.json") -> None:
    if cohere or mixtral:
        flag = "--cohere" if cohere else f"--mixtral {mixtral}"
        note(f"{flag} is not needed and is ignored: the model family is read from {where}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _direction(inverse: bool, exact_inverse: bool, adapter_type: str) -> str:
    """--inverse: class −1 exactly as trained (−W' for full / symmetrise / antisymmetrise, the
    exact inverse for spectral); --exact-inverse: (I + W')⁻¹ − I for every type (Woodbury)."""
    from cap_common.errors import CapError

    if inverse and exact_inverse:
        raise CapError("--inverse and --exact-inverse exclude each other")
    if exact_inverse:
        return "inverse"
    if inverse:
        return "inverse" if adapter_type == "spectral" else "negate"
    return "forward"


def _direction_words(direction: str) -> str:
    return {
        "forward": "class +1 (I + W')",
        "inverse": "class −1, exact inverse (I + W')⁻¹",
        "negate": "class −1 as trained, I − W'",
    }[direction]


force_option = click.option("--force", is_flag=True, help="replace OUT if it exists and is not empty")
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="dtype of the saved LoRA tensors",
)
inverse_option = click.option(
    "--inverse",
    is_flag=True,
    help="class −1 as trained: −W' (full/symmetrise/antisymmetrise) or the exact inverse (spectral)",
)
exact_inverse_option = click.option(
    "--exact-inverse",
    is_flag=True,
    help="the exact inverse (I + W')⁻¹ − I for any type (Woodbury; spectral: closed form)",
)
cohere_option = click.option(
    "--cohere", is_flag=True, help="accepted for qlora-pipe-lite compatibility; the family comes from config.json"
)
mixtral_option = click.option(
    "--mixtral",
    type=int,
    default=None,
    metavar="N",
    help="accepted for qlora-pipe-lite compatibility; the family comes from config.json",
)


@click.group(cls=PeerGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Turn a trained adapter (an epoch<N>/ folder, or a checkpoint of the run: checkpoints/step<N>/)
    into files that PEFT, transformers and llama.cpp load.

    \b
    multiplicative CKPT OUT            lossless multiplicative LoRA on the residual writers
    additive BASE CKPT OUT             standard PEFT LoRA (exact at the adapter's rank)
    merge BASE LORA OUT                full model folder with the LoRA merged in
    gguf LORA OUT --base BASE          GGUF LoRA adapter for llama.cpp
    verify BASE ADAPTER [EXPORTED]     max |Δlogit| and KL between trained and exported forms
    inspect ADAPTER                    per-layer norms, singular values and effective ranks

    Run `cap-export COMMAND --help` for each; the README's 'cap-export' section explains the math.
    """


@main.command()
@click.argument("ckpt", type=_path)
@click.argument("out", type=_path)
@click.option(
    "--base",
    "base_dir",
    type=_path,
    default=None,
    help="base model folder (config.json is enough); names the writers (Mixtral experts) and checks shapes",
)
@inverse_option
@exact_inverse_option
@dtype_option
@force_option
@cohere_option
@mixtral_option
@user_errors(PROG)
def multiplicative(ckpt, out, base_dir, inverse, exact_inverse, dtype, force, cohere, mixtral):
    """Control Adapter CKPT → multiplicative LoRA in OUT (lossless).

    On every residual writer M (o_proj, down_proj, each Mixtral expert's w2): lora_A = V [k,H],
    lora_B = U [H,k] with U·V = W' (scale folded in as √s on each factor; symmetrised types as
    exact rank-2r factors). Merge with `cap-export merge --multiplicative`: M ← M + B·(A·M).
    """
    from cap_export import convert
    from cap_export.adapters import load_control
    from cap_export.base import Base, writer_keys
    from cap_export.compat import check_fits, family_without_base, recorded_base
    from cap_export.staging import check_output

    start = time.time()
    inputs = {"CKPT": ckpt, "--base": base_dir}
    check_output(out, force, inputs=inputs)
    control = load_control(ckpt)
    inputs["BASE recorded in CKPT"] = recorded_base(control.config)
    direction = _direction(inverse, exact_inverse, control.adapter_type)
    if base_dir is not None:
        _compat(cohere, mixtral)
        base = Base(base_dir, need_weights=False)
        check_fits(control, base)
        family, config, how = base.family, base.config, f"family {base.family.model_type} from {base_dir}/config.json"
        made_for = family.model_type
    else:
        family, config, how = family_without_base(control.config, control.hidden_size, mixtral, cohere)
        # Without a base model only the modules (and the hidden size) are recorded: any family that has them merges it.
        made_for = family.model_type if inputs["BASE recorded in CKPT"] else None
    converted = convert.multiplicative(
        control,
        lambda layer: writer_keys(family, config, layer),
        made_for,
        direction,
        dtype,
        str(Path(base_dir).resolve()) if base_dir else "",
    )
    convert.save(converted, out, force, inputs)
    click.echo(
        f"{PROG} multiplicative: {converted.modules} modules on {len(control.layers)} layers, rank "
        f"{converted.rank}, {_direction_words(direction)}, {dtype} ({how}) → {out} "
        f"[{time.time() - start:.1f} s]"
    )


@main.command()
@click.argument("base_dir", metavar="BASE", type=_path)
@click.argument("ckpt", type=_path)
@click.argument("out", type=_path)
@inverse_option
@exact_inverse_option
@click.option(
    "--rank", type=int, default=None, help="truncate each ΔM to its best rank-R approximation (thin SVD of the factors)"
)
@dtype_option
@force_option
@cohere_option
@mixtral_option
@user_errors(PROG)
def additive(base_dir, ckpt, out, inverse, exact_inverse, rank, dtype, force, cohere, mixtral):
    """Control Adapter CKPT → standard PEFT LoRA in OUT, for the base model BASE.

    For each writer weight M: ΔM = W'·M = U·(V·M), stored as lora_B = U, lora_A = V·M with PEFT
    scaling 1. Exact at the adapter's rank (r, or 2r for symmetrised types); no SVD unless --rank.
    """
    from cap_export import convert
    from cap_export.adapters import load_control
    from cap_export.base import Base
    from cap_export.compat import approximation_note, check_fits, recorded_base
    from cap_export.staging import check_output

    start = time.time()
    inputs = {"BASE": base_dir, "CKPT": ckpt}
    check_output(out, force, inputs=inputs)
    _compat(cohere, mixtral)
    control = load_control(ckpt)
    inputs["BASE recorded in CKPT"] = recorded_base(control.config)
    direction = _direction(inverse, exact_inverse, control.adapter_type)
    base = Base(base_dir)
    check_fits(control, base)
    converted = convert.additive(control, base, direction, rank, dtype)
    convert.save(converted, out, force, inputs)
    gap = approximation_note(control.target, base.family)
    if gap:
        note(gap)
    if base.family.fused_experts and not base.family.peft_loads_experts:
        note(
            f"PEFT (with transformers 5.24) loads no LoRA on the experts of a {base.family.model_type} model and "
            f"drops those pairs with a warning; `cap-export merge {base_dir} {out} MERGED` applies them all"
        )
    full_rank = control.rank * (2 if control.adapter_type in ("symmetrise", "antisymmetrise") else 1)
    exact = "exact" if rank is None or rank >= full_rank else f"truncated from {full_rank}"
    click.echo(
        f"{PROG} additive: {converted.modules} modules on {len(control.layers)} layers of a "
        f"{base.family.model_type} model, rank {converted.rank} ({exact}), {_direction_words(direction)}, "
        f"{dtype} → {out} [{time.time() - start:.1f} s]"
    )


@main.command()
@click.argument("base_dir", metavar="BASE", type=_path)
@click.argument("lora_dir", metavar="LORA", type=_path)
@click.argument("out", type=_path)
@click.option(
    "--multiplicative",
    "multiplicative_flag",
    is_flag=True,
    help="merge as M ← M + s·B·(A·M) (automatic for LoRAs marked multiplicative)",
)
@click.option("--scale", type=float, default=1.0, show_default=True, help="factor F on the LoRA: M ← M + F·s·B·A")
@force_option
@cohere_option
@mixtral_option
@user_errors(PROG)
def merge(base_dir, lora_dir, out, multiplicative_flag, scale, force, cohere, mixtral):
    """Merge LORA into BASE, writing a full model folder OUT (same shards, dtypes and files).

    Works one tensor at a time: memory stays well under one shard.
    """
    from cap_common.errors import CapError
    from cap_export import merge as merging
    from cap_export.adapters import load_lora
    from cap_export.base import Base
    from cap_export.staging import check_output, folder_size, staged_output

    start = time.time()
    inputs = {"BASE": base_dir, "LORA": lora_dir}
    check_output(out, force, inputs=inputs)
    if not math.isfinite(scale):
        raise CapError(f"--scale {scale}: must be a finite number")
    _compat(cohere, mixtral)
    base = Base(base_dir)
    lora = load_lora(lora_dir)
    multiplicative_mode, mode_note = merging.merge_mode(lora, multiplicative_flag)
    if mode_note:
        note(mode_note)
    with staged_output(out, force, inputs=inputs) as tmp:
        summary = merging.merge(base, lora, tmp, multiplicative_mode, scale)
    click.echo(
        f"{PROG} merge: {summary['modules']} LoRA modules into {summary['tensors']} tensors of "
        f"{summary['shards']} shard(s), {'multiplicative' if multiplicative_mode else 'additive'}, "
        f"scale {scale:g}; copied {', '.join(summary['copied']) or 'no other files'} → {out} "
        f"({_mib(folder_size(out))}) [{time.time() - start:.1f} s]"
    )


@main.command()
@click.argument("lora_dir", metavar="LORA", type=_path)
@click.argument("out", type=_path)
@click.option("--base", "base_dir", type=_path, required=True, help="base model folder (its config.json)")
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False),
    default="f32",
    show_default=True,
    help="GGUF tensor type of lora_a / lora_b (any case; q8_0 stores rows not a multiple of 32 long as f16)",
)
@force_option
@user_errors(PROG)
def gguf(lora_dir, out, base_dir, outtype, force):
    """PEFT LoRA folder LORA → GGUF LoRA adapter file OUT for llama.cpp (`--lora OUT`)."""
    from cap_export.adapters import load_lora
    from cap_export.base import Base
    from cap_export.gguf_export import export_gguf
    from cap_export.staging import check_output, staged_output

    start = time.time()
    inputs = {"LORA": lora_dir, "--base": base_dir}
    check_output(out, force, is_file=True, inputs=inputs)
    base = Base(base_dir, need_weights=False)
    lora = load_lora(lora_dir)
    with staged_output(out, force, is_file=True, inputs=inputs) as tmp_file:
        summary = export_gguf(lora, base, tmp_file, outtype)
    if summary.get("f16_fallback"):
        note(
            f"{summary['f16_fallback']} tensors have rows that are not a multiple of 32 values long (q8_0's "
            f"block), e.g. lora_b [out, r] for r < 32: stored as f16, as llama.cpp's converter does"
        )
    click.echo(
        f"{PROG} gguf: {summary['tensors']} tensors, architecture {summary['architecture']}, "
        f"alpha {summary['alpha']:g}, {outtype} → {out} ({_mib(Path(out).stat().st_size)}) "
        f"[{time.time() - start:.1f} s]"
    )


@main.command()
@click.argument("base_dir", metavar="BASE", type=_path)
@click.argument("adapter", type=_path)
@click.argument("exported", type=_path, required=False)
@click.option("--inverse", is_flag=True, help="class −1 as trained (see additive --inverse)")
@click.option("--exact-inverse", is_flag=True, help="class −1 compared with an exact-inverse export")
@click.option("--rank", type=int, default=None, help="with no EXPORTED: convert at this rank (see additive --rank)")
@click.option(
    "--text",
    "text_file",
    type=_exists,
    default=None,
    help="sample text, one sample per non-empty line (default: a few built-in sentences)",
)
@click.option("--max-tokens", type=int, default=128, show_default=True, help="tokens per sample at most")
@click.option(
    "--tolerance",
    type=float,
    default=1e-3,
    show_default=True,
    help="largest acceptable max |Δlogit|; above it the exit code is 1",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float64", "bfloat16"]),
    default="float32",
    show_default=True,
    help="dtype both models run in",
)
@user_errors(PROG)
def verify(base_dir, adapter, exported, inverse, exact_inverse, rank, text_file, max_tokens, tolerance, dtype):
    """Run BASE with the adapter as trained and as exported; print max |Δlogit| and mean KL.

    ADAPTER is the Control Adapter (epoch<N>/ or checkpoint) and EXPORTED its export: a PEFT LoRA
    folder or a merged model folder. Without EXPORTED, ADAPTER is converted to an additive LoRA
    now (--inverse / --exact-inverse / --rank as for `additive`); an export made by cap-export may also
    be given alone as ADAPTER (it records its source). Exit code 1 when max |Δlogit| > --tolerance
    or when any logit or the KL is not finite.
    """
    import tempfile

    from cap_common.errors import CapError
    from cap_export import convert
    from cap_export import verify as verifying
    from cap_export.adapters import load_control
    from cap_export.base import Base
    from cap_export.compat import approximation_note, check_fits
    from cap_export.folders import read_provenance
    from cap_export.staging import temporary_folder

    start = time.time()
    if not tolerance >= 0:
        raise CapError(f"--tolerance {tolerance}: must be a number ≥ 0")
    control_dir, exported = verifying.resolve(adapter, exported)
    control = load_control(control_dir)
    base = Base(base_dir)
    check_fits(control, base)
    if exported is not None:
        verifying.check_export(base, exported)
    record = read_provenance(exported) if exported is not None else {}
    if inverse or exact_inverse:
        direction = _direction(inverse, exact_inverse, control.adapter_type)
    else:
        direction = record.get("direction") or "forward"
    texts = list(verifying.SAMPLE_TEXT)
    if text_file is not None:
        try:
            texts = [line for line in Path(text_file).read_text().splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise CapError(f"{text_file}: not UTF-8 text ({e})") from None
    with temporary_folder(Path(tempfile.gettempdir()), "cap-export-verify") as scratch:
        if exported is None:
            converted = convert.additive(control, base, direction, rank, "float32", progress=False)
            exported = scratch / "additive"
            convert.save(converted, exported)
            what = f"additive LoRA converted now (rank {converted.rank})"
        else:
            what = str(exported)
        report, kind = verifying.run_verify(base, control, exported, direction, texts, scratch, max_tokens, dtype)
    c = -1 if direction in ("inverse", "negate") else +1
    click.echo(
        f"{PROG} verify: {base.family.model_type} ({base.family.block} block), {control.adapter_type} adapter "
        f"on '{control.target}', class {c:+d}; exported: {kind}: {what}"
    )
    click.echo(
        f"  {report.tokens} tokens in {dtype}: max |Δlogit| = {report.max_abs:.3g}, mean KL = "
        f"{report.mean_kl:.3g} nats (the adapter itself moves logits by up to {report.effect:.3g})"
    )
    notes = [approximation_note(control.target, base.family)]
    if direction == "inverse" and control.adapter_type != "spectral":
        notes.append(
            "class −1 of this adapter type was trained as I − W'; the export is the exact inverse "
            "(I + W')⁻¹, which differs by O(W'²) (export with --inverse to match training)"
        )
    stored = verifying.stored_dtype(exported)
    if stored in ("bfloat16", "float16"):
        notes.append(
            f"the merged weights are stored in {stored}: rounding M + ΔM to {stored} alone moves logits "
            f"by amounts of this order; the LoRA itself (additive) is the exact form"
        )
    if record.get("scale", 1.0) != 1.0:
        notes.append(f"the export was merged with --scale {record['scale']:g}; the trained model has scale 1")
    for line in filter(None, notes):
        note(line)
    if report.problems:
        for problem in report.problems:
            click.echo(f"  NOT FINITE: {problem} [{time.time() - start:.1f} s]")
        sys.exit(1)
    ok = report.max_abs <= tolerance
    click.echo(
        f"  {'OK' if ok else 'ABOVE TOLERANCE'}: max |Δlogit| {report.max_abs:.3g} "
        f"{'≤' if ok else '>'} {tolerance:g} [{time.time() - start:.1f} s]"
    )
    if not ok:
        sys.exit(1)


@main.command()
@click.argument("adapter", type=_path)
@click.option("--json", "as_json", is_flag=True, help="print a JSON document instead of the table")
@click.option(
    "--plot", "png", type=_path, default=None, metavar="PNG", help="also draw ‖W'‖_F and ‖W'‖₂ by layer into PNG"
)
@click.option("--top", type=int, default=8, show_default=True, help="leading singular values shown per row")
@user_errors(PROG)
def inspect(adapter, as_json, png, top):
    """Per layer of a Control Adapter (W') or per module of a PEFT LoRA (s·B·A): Frobenius and
    spectral norm, the leading --top singular values and the effective rank, from the factors.

    ADAPTER is an epoch<N>/ folder, a training checkpoint or a LoRA folder. erank = exp(H(p)) with
    p = σ/Σσ; rank>1% counts σ above 1% of σ_max. See cap_export/inspect_adapter.py.
    """
    import json

    from cap_export import inspect_adapter

    start = time.time()
    if png is not None:
        inspect_adapter.plot_available()
        inspect_adapter.check_plot(png, adapter)
    report = inspect_adapter.inspect(adapter, top)
    if png is not None:
        inspect_adapter.write_plot(report, png)
    if as_json:
        click.echo(json.dumps({**report.to_json(), "plot": str(png) if png else None}, indent=2))
        return
    lines = report.table()
    lines[-1] += f" [{time.time() - start:.1f} s]"
    click.echo("\n".join(lines))
    if png is not None:
        click.echo(f"plot → {png}")


if __name__ == "__main__":
    main()
