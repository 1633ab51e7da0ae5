"""cap-prep CONFIG: tokenize and pack the config's [[datasets]] into a prepared folder (README, 'cap-prep')."""

from __future__ import annotations

import click

from cap_common.cli import CONFIG_HELP, REMOTE_CODE, PeerFlags, user_errors
from cap_common.config import load_config


@click.command(
    cls=PeerFlags,
    prog="cap-prep",
    peer_flags=REMOTE_CODE,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="CONFIG: " + CONFIG_HELP,
)
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--add-prefix-space",
    is_flag=True,
    help="Tokenize with add_prefix_space (same as add_prefix_space = true in CONFIG).",
)
@click.option("--force", is_flag=True, help="Rebuild even if a complete prepared folder exists.")
@click.option(
    "--show",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Then print N packed train sequences decoded, trained tokens marked by class (colour on a terminal, "
    "[+ … ] / [- … ] otherwise), to check the masking before a long run.",
)
@user_errors("cap-prep")
def main(config, add_prefix_space, force, show):
    """Tokenize and pack the [[datasets]] of CONFIG for cap-train.

    CONFIG is the TOML file shared with cap-train and cap-export; the keys cap-prep reads
    (model_dir, prepared_dir, sequence_len, sequence_prefix, document_prefix, document_suffix,
    mask_tokens, drop_tails, mix_datasets, max_sequences, eval_fraction, seed and [[datasets]]
    with their control_class, document_prefix, document_suffix, drop_tails and max_tokens; for
    conversations format, fields, train_roles, chat_template and document_attention) are
    listed in the README's config reference. The result goes to <prepared_dir>/<fingerprint>/
    (manifest.json, train-*.arrow, eval-*.arrow); a second run with the same inputs reuses it.
    """
    from cap_prep.build import prepare

    cfg = load_config(config, {"add_prefix_space": True} if add_prefix_space else None)
    folder = prepare(cfg, force=force)
    if show:
        import sys

        from cap_prep.report import show as show_rows
        from cap_prep.tokenize import load_tokenizer

        tok = load_tokenizer(cfg.model_dir, cfg.add_prefix_space)
        click.echo(show_rows(folder, tok, show, colour=sys.stdout.isatty()))
    click.echo(str(folder))


if __name__ == "__main__":
    main()
