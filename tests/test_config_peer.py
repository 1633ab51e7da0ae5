"""qlora-pipe-lite's configs in cap: every key either generation reads, in the shapes of its example
configs, loads with its meaning there; cap-prep applies max_tokens, document_prefix and the
top-level document_suffix (checked token by token against a direct tokenizer call); each new kind
of bad value is one line and exit code 2.

The generations (see /work/shared/reference/qlora-pipe-lite-spec.md): "Era A" (Aug 2025, A/B Control
Adapters, the one its README documents) and "HEAD" (Oct 2025, Q/S Control Adapters).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tomllib
import transformers
from click.testing import CliRunner

from cap_common import config as config_module
from cap_common.config import Config, DatasetConfig, load_config
from cap_common.models.families import FAMILIES
from cap_prep import build, cache, load_manifest, prepare, report, windows
from cap_prep.cli import main as prep_main
from cap_prep.pack import kept_lengths
from cap_prep.tokenize import DocumentEncoder, resolve_options
from cap_train.cli import main as train_main
from cap_train.trainer import epoch_eval_steps, eval_steps
from tests.test_config import write  # noqa: F401 - the fixture: cfg.toml from MINIMAL + extra keys
from tests.test_prep import L, documents, read, reference_pack, write_all_formats, write_config
from tests.test_prep_windows import make_text, metaspace_folder

# Every key qlora-pipe-lite reads: HEAD's (spec §2) and Era A's extras (spec §E.1).
PEER_KEYS = {
    "model_dir", "output_dir", "lr", "epochs", "sequence_len", "datasets", "eval_fraction", "evals_per_epoch",
    "gradient_accumulation_steps", "eval_gradient_accumulation_steps", "pipeline_stages", "partition_method",
    "use_column_major_topology", "checkpoint_interval_hours", "max_checkpoints", "beta1", "beta2", "eps",
    "full_fine_tune", "use_control_adapters", "load_in_4bit", "lora_rank", "lora_dropout", "lora_weight_dtype",
    "lora_weight_decay", "control_adapter_gamma", "target_modules", "layers_to_transform", "max_sequences",
    "drop_tails", "mix_datasets", "sequence_prefix", "document_prefix", "document_suffix", "mask_tokens",
    # Era A only
    "lora_alpha", "lora_weight_decay_type", "lora_max_norm", "control_adapter_type", "evals_per_run",
}  # fmt: skip
PEER_DATASET_KEYS = {"dataset_path", "control_class", "max_tokens", "document_suffix"}

# The shapes of qlora-pipe-lite's examples/config_{control_adapter,lora,qlora,full_finetune}.toml
SHAPES = {
    "control adapter (HEAD)": """
model_dir = '{model}'
output_dir = '/tmp/never-written/control_adapter'
use_control_adapters = true
lora_rank = 16
lora_dropout = 0.0
lora_weight_dtype = 'float32'
lora_weight_decay = 10.0
control_adapter_gamma = 0.5
layers_to_transform = '0:2'
lr = 2e-5
epochs = 2
beta1 = 0.9
beta2 = 0.99
eps = 1e-6
sequence_len = 4096
gradient_accumulation_steps = 64
eval_gradient_accumulation_steps = 8
pipeline_stages = 1
partition_method = 'uniform'
use_column_major_topology = false
checkpoint_interval_hours = 1
max_checkpoints = 3
eval_fraction = 0.01
evals_per_epoch = 10
max_sequences = 100000
drop_tails = false
mix_datasets = false
sequence_prefix = 0
document_prefix = 'Story: '
document_suffix = '<|eos|>'
mask_tokens = true

[[datasets]]
dataset_path = 'data/positive/*.json'
control_class = 1
max_tokens = 10000000

[[datasets]]
dataset_path = 'data/negative/*.json'
control_class = -1
max_tokens = 10000000

[[datasets]]
dataset_path = 'data/neutral/*.txt'
control_class = 0
""",
    "control adapter (Era A)": """
model_dir = '{model}'
output_dir = 'out'
use_control_adapters = true
control_adapter_type = 'symmetrise'
lora_rank = 16
lora_alpha = 4
lora_dropout = 0.05
lora_weight_decay = 10.0
lora_weight_decay_type = 'nuclear'
lora_max_norm = 1.0
lora_weight_dtype = 'float32'
layers_to_transform = '0:1, 2:3'
lr = 2e-5
sequence_len = 4096
gradient_accumulation_steps = 64
evals_per_run = 5

[[datasets]]
dataset_path = 'data/positive_examples.json'
control_class = 1
document_suffix = "<EOT>"

[[datasets]]
dataset_path = 'data/negative_examples.json'
control_class = -1
document_suffix = ""
""",
    "lora (HEAD)": """
model_dir = '{model}'
output_dir = 'out'
lora_rank = 64
lora_alpha = 64
lora_dropout = 0.05
lora_weight_decay = 10.0
lora_weight_dtype = 'float32'
target_modules = 'all-linear'
layers_to_transform = '0:1,3'
lr = 5e-5
sequence_len = 2048
pipeline_stages = 2
partition_method = 'type:decoderlayer'
evals_per_epoch = 4
document_suffix = [1]

[[datasets]]
dataset_path = 'raw_text_data/*.txt'

[[datasets]]
dataset_path = 'structured_data/*.parquet'
document_suffix = 5
document_prefix = [7, 8]
""",
    "qlora (Era A)": """
model_dir = '{model}'
output_dir = 'out'
load_in_4bit = true
lora_rank = 64
lora_alpha = 64
lora_dropout = 0.05
lora_weight_decay = 10.0
lora_weight_decay_type = 'l2'
lora_max_norm = 1.0
target_modules = ['q_proj', 'k_proj', 'v_proj', 'o_proj']
layers_to_transform = 2
lr = 5e-5
sequence_len = 2048
mask_tokens = [0, 1]

[[datasets]]
dataset_path = 'data/*.jsonl'
""",
    "full fine-tune (HEAD)": """
model_dir = '{model}'
output_dir = 'out'
full_fine_tune = true
target_modules = ['mlp']
layers_to_transform = '1, 3'
lr = 1e-5
sequence_len = 2048
evals_per_epoch = 1

[[datasets]]
dataset_path = 'data/*.json'
""",
}


@pytest.fixture
def model(tiny_model_dir):
    return tiny_model_dir("llama")  # 4 decoder layers


@pytest.fixture
def quiet_notes(monkeypatch):
    """A fresh record of the notes printed, as in a new process (and not a launched worker)."""
    monkeypatch.setattr(config_module, "_noted", set())
    for variable in ("RANK", "SLURM_PROCID", "CAP_WORKER"):
        monkeypatch.delenv(variable, raising=False)


def config_file(tmp_path, text: str):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the example shapes
def test_shapes_use_every_key_of_both_generations():
    top, per_dataset = set(), set()
    for text in SHAPES.values():
        raw = tomllib.loads(text)
        top |= set(raw)
        per_dataset |= {k for t in raw["datasets"] for k in t}
    assert top >= PEER_KEYS and per_dataset >= PEER_DATASET_KEYS
    fields = {f for f in Config.__dataclass_fields__ if f != "source"}
    assert PEER_KEYS <= fields and PEER_DATASET_KEYS <= set(DatasetConfig.__dataclass_fields__)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_peer_example_shapes_load(shape, tmp_path, model, quiet_notes, capsys):
    cfg = load_config(config_file(tmp_path, SHAPES[shape].format(model=model)))
    notes = capsys.readouterr().err.strip().splitlines()
    if shape == "control adapter (HEAD)":
        # an Oct-2025 config: what that generation trains, each said in a note
        assert cfg.mode == "control" and (cfg.control_adapter_type, cfg.lora_weight_decay_type) == ("spectral", "l2")
        assert cfg.layers_to_transform == (0, 1, 2)
        assert cfg.evals_per_epoch == 10 and cfg.evals_per_run == 11  # the default, unused
        assert cfg.partition_method == "uniform" and cfg.control_adapter_gamma == 0.5
        assert cfg.sequence_prefix == (0,) and cfg.mask_tokens is True
        assert [d.control_class for d in cfg.datasets] == [1, -1, 0]
        assert [d.max_tokens for d in cfg.datasets] == [10_000_000, 10_000_000, None]
        # the top-level document_prefix / document_suffix are every dataset's
        assert {(d.document_prefix, d.document_suffix) for d in cfg.datasets} == {("Story: ", "<|eos|>")}
        assert len(notes) == 3 and "control_adapter_gamma = 0.5 has no effect in cap" in notes[0]
        assert "control_adapter_type = 'spectral' as it trained" in notes[1] and "lora_weight_decay_type" in notes[2]
    elif shape == "control adapter (Era A)":
        assert cfg.control_adapter_type == "symmetrise" and cfg.alpha == 4.0
        assert (cfg.lora_weight_decay_type, cfg.lora_max_norm, cfg.lora_dropout) == ("nuclear", 1.0, 0.05)
        assert cfg.layers_to_transform == (0, 1, 2, 3) and cfg.evals_per_run == 5 and cfg.evals_per_epoch is None
        assert [d.document_suffix for d in cfg.datasets] == ["<EOT>", ""]
        assert [d.document_prefix for d in cfg.datasets] == [None, None]
        assert notes == []
    elif shape == "lora (HEAD)":
        assert cfg.mode == "lora" and cfg.target_modules is None  # 'all-linear' = cap's default
        assert cfg.layers_to_transform == (0, 1, 3) and cfg.alpha == 64.0
        assert cfg.pipeline_stages == 2 and cfg.partition_method == "type:decoderlayer"
        assert [(d.document_prefix, d.document_suffix) for d in cfg.datasets] == [(None, (1,)), ((7, 8), (5,))]
        assert notes == []
    elif shape == "qlora (Era A)":
        assert cfg.mode == "qlora" and cfg.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
        assert cfg.layers_to_transform == (2,) and cfg.lora_weight_decay_type == "l2"
        assert notes == []
    else:
        assert cfg.mode == "full" and cfg.lora_rank is None and cfg.evals_per_epoch == 1
        assert cfg.layers_to_transform == (1, 3) and cfg.target_modules == ("mlp",)
        assert notes == []  # both keys restrict what trains (tests/test_train_full_select.py)


def test_notes_print_once_per_process_and_not_in_workers(tmp_path, model, quiet_notes, capsys, monkeypatch):
    path = config_file(tmp_path, SHAPES["control adapter (HEAD)"].format(model=model))
    load_config(path)
    load_config(path)
    err = capsys.readouterr().err
    assert err.count("note: ") == 3 and err.startswith(f"note: {path}: control_adapter_gamma = 0.5 has no effect")
    for variable, value in (("CAP_WORKER", "1"), ("RANK", "1"), ("SLURM_PROCID", "3")):
        # a worker cap-train's launcher started (it said the notes), a rank > 0 under torchrun or srun
        monkeypatch.setattr(config_module, "_noted", set())
        with monkeypatch.context() as env:
            env.setenv(variable, value)
            load_config(path)
        assert capsys.readouterr().err == "", variable
    monkeypatch.setenv("RANK", "0")  # rank 0 under torchrun says them
    load_config(path)
    assert capsys.readouterr().err.count("note: ") == 3


# ---------------------------------------------------------------- single keys
@pytest.mark.parametrize(
    "value, layers",
    [
        ("'0:2'", (0, 1, 2)),
        ("'0:1,3'", (0, 1, 3)),
        ("' 0 : 1 , 3 ,, '", (0, 1, 3)),
        ("'1,3,2,3'", (1, 2, 3)),
        ("'3'", (3,)),
        ("2", (2,)),
        ("[3, 1, 1]", (1, 3)),
        ("'2:3, 0:2'", (0, 1, 2, 3)),
        ("''", None),  # qlora-pipe-lite: empty = all layers
    ],
)
def test_layers_to_transform_forms(value, layers, write):
    assert load_config(write(f"layers_to_transform = {value}")).layers_to_transform == layers


@pytest.mark.parametrize(
    "value", ["'uniform'", "'UNIFORM'", "'type:decoderlayer'", "'type:DecoderLayer'", "'type:^dec'"]
)
def test_partition_methods_cap_supports(value, write):
    assert load_config(write(f"partition_method = {value}")).partition_method == value.strip("'")


def test_partition_method_default_is_what_cap_does(write):
    from cap_common.models.pipeline import PARTITION_METHOD

    cfg = load_config(write())
    assert (cfg.partition_method, PARTITION_METHOD) == ("type:decoderlayer", "type:DecoderLayerPipe")
    assert (cfg.evals_per_epoch, cfg.control_adapter_gamma, cfg.document_prefix, cfg.document_suffix) == (None,) * 4
    assert (cfg.datasets[0].document_prefix, cfg.datasets[0].max_tokens) == (None, None)


@pytest.mark.parametrize(
    "extra, dataset_extra, expected",
    [
        ("document_prefix = 'A: '", "", ("A: ", None)),
        ("document_prefix = 'A: '", "document_prefix = [4, 5]", ((4, 5), None)),
        ("document_prefix = 3\ndocument_suffix = ''", "", ((3,), "")),
        ("document_suffix = ' END'", "", (None, " END")),
        ("document_suffix = ' END'", "document_suffix = 9", (None, (9,))),
        ("document_prefix = 'A'\ndocument_suffix = 'B'", "document_prefix = ''\ndocument_suffix = ''", ("", "")),
    ],
)
def test_top_level_document_prefix_and_suffix_are_dataset_defaults(extra, dataset_extra, expected, write):
    cfg = load_config(write(extra, dataset_extra))
    assert (cfg.datasets[0].document_prefix, cfg.datasets[0].document_suffix) == expected


def test_new_dataset_keys_keep_old_fingerprints_and_run_records(write):
    """Unset, document_prefix and max_tokens are not in the prep keys nor the run record, so prepared
    folders and checkpoints of configs written before they existed keep matching."""
    plain = load_config(write())
    assert cache.prep_keys(plain)["datasets"] == [{"control_class": 1, "document_suffix": None}]
    assert plain.to_dict()["datasets"][0].keys() == {"dataset_path", "control_class", "document_suffix"}
    cfg = load_config(write("document_prefix = 'A: '", "max_tokens = 100"))
    assert cache.prep_keys(cfg)["datasets"] == [
        {"control_class": 1, "document_suffix": None, "document_prefix": "A: ", "max_tokens": 100}
    ]
    assert cfg.to_dict()["datasets"][0]["document_prefix"] == "A: " and cfg.to_dict()["datasets"][0]["max_tokens"]


# (config change, dataset change, the words the one-line message must contain)
ERRORS = [
    ("evals_per_run = 5\nevals_per_epoch = 2", "", ["evals_per_run and evals_per_epoch are mutually exclusive"]),
    ("evals_per_epoch = 0", "", ["evals_per_epoch = 0", "expected an integer >= 1"]),
    ("partition_method = 'balanced'", "", ["partition_method = 'balanced'", "'uniform', 'parameters' or 'type:"]),
    ("partition_method = 'type:['", "", ["partition_method = 'type:['", "'uniform'"]),
    ("partition_method = 1", "", ["partition_method = 1", "'uniform'"]),
    ("control_adapter_gamma = 0.75", "", ["control_adapter_gamma = 0.75", "(0, 0.5]"]),
    ("control_adapter_gamma = 'x'", "", ["control_adapter_gamma = 'x'", "expected a number"]),
    ("target_modules = 'all'", "", ["target_modules = 'all'", "'all-linear'"]),
    ("target_modules = []", "", ["target_modules = []", "non-empty list"]),
    ("use_control_adapters = true\ntarget_modules = 'all-linear'", "", ["target_modules is not allowed"]),
    ("layers_to_transform = '0:2, x'", "", ["layers_to_transform = '0:2, x'", "'first:last'"]),
    ("layers_to_transform = '1, 3:1'", "", ["layers_to_transform = '1, 3:1'", "first (3) is after last (1)"]),
    ("layers_to_transform = '0:1:2'", "", ["layers_to_transform = '0:1:2'", "comma-separated"]),
    ("layers_to_transform = '0:1, 9'", "", ["layer 9 does not exist", "0:3"]),
    ("layers_to_transform = -1", "", ["layers_to_transform = -1", "a layer index"]),
    ("layers_to_transform = true", "", ["layers_to_transform = True", "a layer index"]),
    ("document_prefix = 1.5", "", ["document_prefix = 1.5", "token id"]),
    ("document_suffix = [1, -2]", "", ["document_suffix = [1, -2]", "token id"]),
    ("", "document_prefix = true", ["datasets[0]: document_prefix = True", "token id"]),
    ("", "max_tokens = 0", ["datasets[0]: max_tokens = 0", "expected an integer >= 1"]),
    ("", "max_tokens = 'all'", ["datasets[0]: max_tokens = 'all'", "expected an integer >= 1"]),
]


@pytest.mark.parametrize("extra, dataset_extra, words", ERRORS, ids=[(e[0] or e[1]).split("\n")[-1] for e in ERRORS])
def test_errors_are_one_line_exit_2(extra, dataset_extra, words, write):
    path = write(extra, dataset_extra)
    result = CliRunner().invoke(train_main, [str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"cap-train: error: {path}")
    for w in words:
        assert w in lines[0]


# ---------------------------------------------------------------- evals_per_epoch
def test_epoch_eval_steps():
    # e = evals_per_epoch evals per epoch at max(1, round(i * spe / e)), i = 1..e, plus step 0
    assert epoch_eval_steps(10, 10, 30) == {0, *range(1, 31)}
    assert epoch_eval_steps(3, 10, 20) == {0, 3, 7, 10, 13, 17, 20}
    assert epoch_eval_steps(4, 10, 10) == {0, 2, 5, 8, 10}  # 2.5 → 2 and 7.5 → 8: Python's round
    assert epoch_eval_steps(10, 3, 6) == {0, 1, 2, 3, 4, 5, 6}  # at most one per step
    assert epoch_eval_steps(1, 5, 15) == {0, 5, 10, 15}  # the end of every epoch
    assert epoch_eval_steps(2, 5, 11) == {0, 2, 5, 7, 10}  # max_steps cut the third epoch at 11
    assert epoch_eval_steps(2, 5, 13, epoch_start=3) == {0, 5, 8, 10, 13}  # epochs restarted at step 3
    assert epoch_eval_steps(5, 0, 0) == {0}
    # the whole-run schedule is unchanged
    assert eval_steps(11, 100) == {0, *range(10, 101, 10)}


# ---------------------------------------------------------------- cap-prep
@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def reference_document(tok, text: str, prefix, suffix) -> list[int]:
    """A document's tokens by the documented rule, from one direct tokenizer call: prefix ids +
    tokenizer(prefix text + text + suffix text) without its leading BOS + suffix ids (None: EOS if missing)."""
    ids = tok((prefix if isinstance(prefix, str) else "") + text + (suffix if isinstance(suffix, str) else ""))[
        "input_ids"
    ]
    if ids and ids[0] == tok.bos_token_id:
        ids = ids[1:]
    if suffix is None and ids[-1:] != [tok.eos_token_id]:
        ids = ids + [tok.eos_token_id]
    elif isinstance(suffix, (list, int)):
        ids = ids + ([suffix] if isinstance(suffix, int) else suffix)
    head = [prefix] if isinstance(prefix, int) else (prefix if isinstance(prefix, list) else [])
    return head + ids


def prepared(tmp_path, model, datasets: list[tuple[list[str], dict]], **keys):
    """Write the documents, run cap-prep on a TOML config (as a user would), return (cfg, folder)."""
    tables = []
    for i, (docs, extra) in enumerate(datasets):
        write_all_formats(tmp_path / f"data{i}", docs)
        tables.append({"dataset_path": f"data{i}/*", **extra})
    cfg = load_config(write_config(tmp_path, model, tables, **keys))
    return cfg, prepare(cfg, quiet=True, shard_bytes=8 * 5 * L)


def expected_rows(tok, streams):
    """streams: [(documents, class, prefix, suffix)] → rows packed by the reference packer, one stream each."""
    rows = []
    for docs, klass, prefix, suffix in streams:
        tokens = [reference_document(tok, t, prefix, suffix) for t in docs]
        rows += reference_pack([(t, [klass] * len(t)) for t in tokens], [tok.bos_token_id], tok.pad_token_id, False)
    return rows


def test_document_prefix_and_top_level_suffix(tmp_path, model, tok):
    a, b, c, d = (documents(9, seed=s) for s in (31, 32, 33, 34))
    cfg, folder = prepared(
        tmp_path,
        model,
        [
            (a, {}),  # both top-level values
            (b, {"control_class": -1, "document_prefix": [7, 8]}),  # id prefix, top-level suffix
            (c, {"document_prefix": 9, "document_suffix": [3, 4]}),  # one id, id suffix
            (d, {"document_prefix": "", "document_suffix": ""}),  # neither
        ],
        document_prefix="Chapter one. ",
        document_suffix=" The end.",
    )
    streams = [
        (a, 1, "Chapter one. ", " The end."),
        (b, -1, [7, 8], " The end."),
        (c, 1, 9, [3, 4]),
        (d, 1, "", ""),
    ]
    expected = expected_rows(tok, streams)
    ids, cls = read(folder)
    assert ids.tolist() == [r[0] for r in expected]
    assert cls.tolist() == [r[1] for r in expected]
    # ... and that is not what the documents give without them
    plain = expected_rows(tok, [(docs, k, None, None) for docs, k, _, _ in streams])
    assert [r[0] for r in plain] != [r[0] for r in expected]
    assert load_manifest(folder)["prep_config"]["datasets"][1]["document_prefix"] == [7, 8]


@pytest.mark.parametrize("prefix", ["Chapter one. ", [7, 8]])
@pytest.mark.parametrize("suffix", [None, " The end.", [3]])
@pytest.mark.parametrize("model_name", ["tiny", "metaspace"])
def test_long_documents_get_the_same_prefix(prefix, suffix, model_name, tmp_path, tiny_model_dir, monkeypatch):
    """The windowed path for long documents (streamed or not) == the batch path == one tokenizer call."""
    for name, value in (("WINDOW_CHARS", 300), ("OVERLAP_CHARS", 64), ("MARGIN_TOKENS", 4), ("BATCH_WINDOWS", 3)):
        monkeypatch.setattr(windows, name, value)
    folder = tiny_model_dir("llama") if model_name == "tiny" else metaspace_folder(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = DocumentEncoder(tok, resolve_options(tok, None, False, "cfg"), suffix, "cfg", prefix)
    for seed in range(2):
        text = make_text(seed, 3000)
        expected = reference_document(tok, text, prefix, suffix)
        assert enc([text])[0].tolist() == expected
        for source in (text, iter([text[:1000], text[1000:1001], text[1001:]])):
            out = []
            assert enc.encode_long(source, out.append) == len(expected)
            assert np.concatenate(out).tolist() == expected


def test_max_tokens_keep_stops_at_the_first_overflow():
    lengths = np.array([5, 3, 4, 2])
    keep = build.max_tokens_keep(lengths, 10, np.array([2, 0, 1, 3]))
    assert keep.tolist() == [True, False, True, False]  # 4 + 5 = 9; + 3 passes 10; the 2 after it is not tried
    assert build.max_tokens_keep(lengths, 14, np.array([0, 1, 2, 3])).tolist() == [True] * 4
    assert build.max_tokens_keep(lengths, 4, np.array([0, 1, 2, 3])).tolist() == [False] * 4


def test_max_tokens(tmp_path, model, tok):
    pos, neg = documents(30, seed=41), documents(12, seed=42)
    prefix = "Note: "
    lengths = np.array([len(reference_document(tok, t, prefix, None)) for t in pos])
    max_tokens = int(lengths.sum() * 0.4)
    cfg, folder = prepared(
        tmp_path,
        model,
        [(pos, {"max_tokens": max_tokens}), (neg, {"control_class": -1})],
        document_prefix=prefix,
        seed=5,
    )
    # the rule, walked by hand over the seeded order: keep while the running total (prefix and
    # suffix included) stays within max_tokens, stop at the first document that would pass it
    order = np.random.default_rng([5, build._MAX_TOKENS, 0]).permutation(len(pos))
    kept, total = set(), 0
    for i in order:
        if total + lengths[i] > max_tokens:
            break
        kept.add(int(i))
        total += int(lengths[i])
    assert 0 < len(kept) < len(pos) and total <= max_tokens
    expected = expected_rows(
        tok, [([t for i, t in enumerate(pos) if i in kept], 1, prefix, None), (neg, -1, prefix, None)]
    )
    ids, cls = read(folder)
    assert ids.tolist() == [r[0] for r in expected]
    assert cls.tolist() == [r[1] for r in expected]
    m = load_manifest(folder)
    ds = m["datasets"][0]
    assert (ds["documents"], ds["max_tokens"]) == (len(pos), max_tokens)
    assert ds["max_tokens_dropped_documents"] == len(pos) - len(kept)
    assert ds["max_tokens_dropped_tokens"] == int(lengths.sum()) - total
    assert ds["train"]["tokens"] == total and m["datasets"][1]["max_tokens_dropped_documents"] == 0
    assert f"max_tokens = {max_tokens:,} kept {len(kept)} of {len(pos)} documents" in report.summary(m)


def test_max_tokens_before_the_eval_split(tmp_path, model, tok):
    docs = [f"Document {i}: " + t for i, t in enumerate(documents(40, seed=43))]
    lengths = [len(reference_document(tok, t, None, None)) for t in docs]
    cfg, folder = prepared(tmp_path, model, [(docs, {"max_tokens": sum(lengths) // 2})], eval_fraction=0.25)
    m = load_manifest(folder)["datasets"][0]
    kept = len(docs) - m["max_tokens_dropped_documents"]
    assert m["eval"]["documents"] == round(0.25 * kept) and m["train"]["documents"] + m["eval"]["documents"] == kept
    assert m["train"]["tokens"] + m["eval"]["tokens"] == sum(lengths) - m["max_tokens_dropped_tokens"]
    assert m["train"]["tokens"] + m["eval"]["tokens"] <= sum(lengths) // 2


@pytest.mark.parametrize(
    "table, keys, words",
    [
        ({"max_tokens": 1}, {}, ["datasets[0]: max_tokens = 1 keeps no document", "tokens)"]),
        (
            {"document_prefix": [1, 600]},
            {},
            ["datasets[0]: document_prefix", "600", "out of the tokenizer's vocabulary"],
        ),
        (
            {},
            {"document_prefix": 9999},
            ["datasets[0]: document_prefix = (9999,)", "out of the tokenizer's vocabulary"],
        ),
    ],
)
def test_prep_errors_are_one_line_exit_2(table, keys, words, tmp_path, model):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in documents(6, seed=44)))
    config = write_config(tmp_path, model, [{"dataset_path": "data/*", **table}], **keys)
    result = CliRunner().invoke(prep_main, [str(config)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("cap-prep: error: "), result.stderr
    for part in words:
        assert part in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written, not even the folders


# ---------------------------------------------------------------- the Oct-2025 generation's defaults
OCT_CONTROL = "use_control_adapters = true\nevals_per_epoch = 2\ncontrol_adapter_gamma = 0.5\nlora_weight_decay = 1.0"


def notes_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]


def test_oct_2025_config_trains_as_that_generation(write, quiet_notes, capsys):
    """Keys only the Oct-2025 generation reads, none only the Aug one or cap reads: the keys it leaves
    unset take that generation's values, each said in one note."""
    path = write(OCT_CONTROL)
    cfg = load_config(path)
    assert (cfg.control_adapter_type, cfg.lora_weight_decay_type) == ("spectral", "l2")
    said = f"note: {path}: qlora-pipe-lite Oct-2025 config (evals_per_epoch, control_adapter_gamma): "
    notes = notes_of(capsys)
    assert f"{said}control_adapter_type = 'spectral' as it trained (set control_adapter_type to choose)" in notes
    assert f"{said}lora_weight_decay_type = 'l2' as it trained (set lora_weight_decay_type to choose)" in notes
    assert len(notes) == 3  # and control_adapter_gamma's own note
    lora = load_config(write("partition_method = 'uniform'", "max_tokens = 1000"))
    assert (lora.mode, lora.lora_alpha, lora.alpha, lora.evals_per_epoch) == ("lora", 4, 4.0, 10)
    assert lora.lora_weight_decay_type == "nuclear"  # no decay: the type means nothing, nothing adopted
    said = f"note: {path}: qlora-pipe-lite Oct-2025 config (partition_method, datasets.max_tokens): "
    assert notes_of(capsys) == [
        f"{said}lora_alpha = 4 as it trained (set lora_alpha to choose)",
        f"{said}evals_per_epoch = 10 as it trained (set evals_per_epoch to choose)",
    ]


def test_oct_2025_config_keeps_what_it_sets(write, quiet_notes, capsys):
    """Setting a key as its note says pins that key alone: the others keep the Oct-2025 values."""
    cfg = load_config(write(OCT_CONTROL + "\ncontrol_adapter_type = 'full'"))
    assert (cfg.control_adapter_type, cfg.lora_weight_decay_type) == ("full", "l2")
    notes = notes_of(capsys)
    assert not [n for n in notes if "control_adapter_type" in n] and [n for n in notes if "'l2'" in n]
    cfg = load_config(write(OCT_CONTROL + "\nlora_weight_decay_type = 'nuclear'"))
    assert (cfg.control_adapter_type, cfg.lora_weight_decay_type) == ("spectral", "nuclear")
    cfg = load_config(write("evals_per_epoch = 3\nlora_rank = 8"))
    assert (cfg.lora_alpha, cfg.evals_per_epoch) == (8, 3)
    cfg = load_config(write("evals_per_epoch = 3\nlora_rank = 8\nlora_alpha = 2"))
    assert (cfg.lora_alpha, cfg.evals_per_epoch) == (2, 3)


@pytest.mark.parametrize(
    "extra, dataset_extra",
    [
        ("seed = 1", ""),
        ("activation_checkpointing = false", ""),
        ("lora_max_norm = 0.5", ""),
        ("", "document_suffix = ''"),
    ],
)
def test_config_with_cap_or_aug_keys_keeps_caps_defaults(extra, dataset_extra, write, quiet_notes, capsys):
    cfg = load_config(write(OCT_CONTROL + "\n" + extra, dataset_extra))
    assert (cfg.control_adapter_type, cfg.lora_weight_decay_type, cfg.lora_alpha) == ("full", "nuclear", None)
    assert not [n for n in notes_of(capsys) if "Oct-2025" in n]


def test_cap_prep_and_cap_train_print_the_generation_notes(write, quiet_notes, monkeypatch):
    path = write("evals_per_epoch = 2")
    result = CliRunner().invoke(prep_main, [str(path)])  # no data files: stops after loading the config
    assert result.exit_code == 2 and "no files match" in result.stderr
    assert [line for line in result.stderr.splitlines() if "note: " in line] == [
        f"note: {path}: qlora-pipe-lite Oct-2025 config (evals_per_epoch): lora_alpha = 4 as it trained "
        "(set lora_alpha to choose)"
    ]
    monkeypatch.setattr(config_module, "_noted", set())  # a new process
    result = CliRunner().invoke(train_main, [str(path), "--plan"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("note: ") == 1 and "lora_alpha = 4 as it trained" in result.stderr


# ---------------------------------------------------------------- smaller peer paths
def test_drop_tails_per_dataset(tmp_path, model, tok):
    """qlora-pipe-lite read drop_tails per [[datasets]] until 2025-08-11; the dataset's value wins."""
    a, b = documents(12, seed=51), documents(12, seed=52)
    cfg, folder = prepared(tmp_path, model, [(a, {"drop_tails": True}), (b, {})])
    packed = []
    for docs, drop in ((a, True), (b, False)):
        tokens = [reference_document(tok, t, None, None) for t in docs]
        packed += reference_pack([(t, [1] * len(t)) for t in tokens], [tok.bos_token_id], tok.pad_token_id, drop)
    ids, cls = read(folder)
    assert ids.tolist() == [r[0] for r in packed] and cls.tolist() == [r[1] for r in packed]
    assert [d.get("drop_tails") for d in cache.prep_keys(cfg)["datasets"]] == [True, None]  # the fingerprint's keys
    keys = [
        cache.prep_keys(load_config(write_config(tmp_path, model, [{"dataset_path": "x", **table}], drop_tails=True)))
        for table in ({"drop_tails": True}, {}, {"drop_tails": False})
    ]
    assert keys[0] == keys[1] != keys[2]


def test_kept_lengths_with_drop_tails_per_document():
    """Per-document drop_tails against a walk token by token."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, capacity = int(rng.integers(1, 12)), int(rng.integers(1, 15))
        length, drop = rng.integers(1, 25, n), rng.random(n) < 0.5
        kept, fill = [], 0
        for size, cut in zip(length, drop):
            k = 0
            for _ in range(size):
                k, fill = k + 1, fill + 1
                if fill == capacity:
                    fill = 0
                    if cut:
                        break
            kept.append(k)
        assert kept_lengths(length, capacity, drop).tolist() == kept
        assert (
            kept_lengths(length, capacity, bool(drop[0])).tolist()
            == kept_lengths(length, capacity, np.full(n, drop[0])).tolist()
        )


@pytest.mark.parametrize("value", ["'parameters'", "'type:embedding'", "'type:.*'"])
def test_partition_methods_deepspeed_takes_are_a_note(value, write, quiet_notes, capsys):
    path = write(f"partition_method = {value}")
    assert load_config(path).partition_method == value.strip("'")
    assert [n for n in notes_of(capsys) if "partition_method =" in n] == [
        f"note: {path}: partition_method = {value}: cap always gives every pipeline stage an equal number of "
        "decoder layers (what 'parameters' approximates)"
    ]


@pytest.mark.parametrize("value, parsed", [("'L1'", "l1"), ("'Nuclear'", "nuclear"), ("'l2'", "l2")])
def test_lora_weight_decay_type_any_case(value, parsed, write):
    assert load_config(write(f"lora_weight_decay_type = {value}")).lora_weight_decay_type == parsed


def test_control_adapter_type_without_control_adapters_is_a_note(write, quiet_notes, capsys):
    path = write("control_adapter_type = 'spectral'")
    assert load_config(path).mode == "lora"
    assert notes_of(capsys) == [
        f"note: {path}: control_adapter_type = 'spectral' has no effect without use_control_adapters = true"
    ]


def test_relative_paths_from_the_working_directory(tmp_path, tiny_model_dir, monkeypatch, quiet_notes, capsys):
    """qlora-pipe-lite resolves relative paths against the working directory: a config in a subfolder
    naming paths from the repository root loads and finds its files; next to the config wins."""
    root = tmp_path / "repo"
    (root / "examples").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(tiny_model_dir("llama"))
    (root / "runs").mkdir()
    (root / "data").mkdir()
    (root / "data" / "a.jsonl").write_text(json.dumps({"text": "one document"}) + "\n")
    text = (
        "model_dir = 'models/tiny'\noutput_dir = 'runs/x'\nprepared_dir = 'prep'\nlr = 1e-4\nsequence_len = 16\n"
        "lora_rank = 2\n[[datasets]]\ndataset_path = 'data/*.jsonl'\n"
    )
    (root / "examples" / "x.toml").write_text(text)
    monkeypatch.chdir(root)
    cfg = load_config("examples/x.toml")
    assert cfg.model_dir == (root / "models" / "tiny").resolve()
    assert (cfg.output_dir, cfg.prepared_dir) == (root / "runs" / "x", root / "examples" / "prep")
    assert [[f.path for f in files] for files in build.find_inputs(cfg)] == [[root / "data" / "a.jsonl"]]
    assert notes_of(capsys) == []
    (root / "examples" / "data").mkdir()
    (root / "examples" / "data" / "b.jsonl").write_text(json.dumps({"text": "another"}) + "\n")
    cfg = load_config("examples/x.toml")
    assert cfg.datasets[0].dataset_path == str(root / "examples" / "data" / "*.jsonl")
    assert notes_of(capsys) == [
        f"note: examples/x.toml: datasets[0].dataset_path = 'data/*.jsonl' is {root / 'examples' / 'data' / '*.jsonl'} "
        f"(next to the config), not {root / 'data' / '*.jsonl'} (under the working directory)"
    ]


@pytest.mark.parametrize("gpus, hint", [("1", "--num-gpus 2"), ("3", "--num-gpus 2"), ("5", "--num-gpus 4")])
def test_world_size_error_names_num_gpus(gpus, hint, write):
    path = write("pipeline_stages = 2")
    result = CliRunner().invoke(train_main, [str(path), "--num-gpus", gpus], env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"cap-train: error: {path}: pipeline_stages = 2 must divide the world size ({gpus} processes): "
        f"run with {hint} (a multiple of pipeline_stages)"
    )


def test_resume_from_a_qlora_pipe_lite_run_is_refused_naming_it(write, tmp_path):
    path = write("use_control_adapters = true\ncontrol_adapter_type = 'spectral'")
    run = tmp_path / "out" / "20251001_12-00-00"
    for folder in ("global_step40", "global_step120", "epoch1"):
        (run / folder).mkdir(parents=True)
    (run / "global_step120" / "layer_02-model_states.pt").write_bytes(b"")
    (run / "latest").write_text("global_step120")
    result = CliRunner().invoke(train_main, [str(path), "--resume-from-checkpoint"], env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    model = load_config(path).model_dir
    assert lines == [
        f"cap-train: error: {run / 'global_step120'}: a qlora-pipe-lite checkpoint, which cap cannot resume "
        f"(DeepSpeed's format); convert its adapter with `cap-export additive {model} {run / 'epoch1'} OUT` "
        "(an epoch's adapter; a mid-epoch checkpoint: qlora-pipe-lite's convert_ds_checkpoint.py first), "
        "or start from scratch without --resume-from-checkpoint"
    ]


@pytest.mark.parametrize(
    "args, line",
    [
        (["--config", "{cfg}"], "cap-train: error: CONFIG is positional: cap-train {cfg}"),
        (["--config={cfg}", "--num-gpus", "2"], "cap-train: error: CONFIG is positional: cap-train {cfg} --num-gpus 2"),
        (
            ["{cfg}", "--num_nodes", "2"],
            "cap-train: error: --num_nodes: cap-train runs on several nodes with --hostfile FILE (DeepSpeed's "
            "hostfile: one `host slots=N` line per node); --include/--exclude pick among them",
        ),
        (["{cfg}", "--num_gpus=2"], "cap-train: error: --num_gpus: cap-train's spelling is --num-gpus"),
    ],
)
def test_peer_flags_get_one_line(args, line, write):
    path = str(write())
    result = CliRunner().invoke(train_main, [a.format(cfg=path) for a in args])
    assert result.exit_code == 2 and result.output.strip() == line.format(cfg=path), result.output


def test_trust_remote_code_is_a_note(write):
    path = str(write())
    result = CliRunner().invoke(train_main, [path, "--trust-remote-code", "--plan"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == (
        "note: --trust-remote-code has no effect: cap never runs a model's own code; it builds the decoder from "
        f"transformers' classes for {', '.join(FAMILIES)}"
    )


def test_multimodal_model_type_is_refused_in_one_line(write, tmp_path):
    """Gemma 3 and Mistral 3 checkpoints train (tests/test_multimodal.py); another multimodal model is
    refused in one line that says how to train its text model."""
    model = tmp_path / "llava"
    model.mkdir()
    text = {"model_type": "llama", "num_hidden_layers": 4}
    (model / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": text}))
    path = write(f"model_dir = '{model}'")
    result = CliRunner().invoke(prep_main, [str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"cap-prep: error: {path}: model_dir = '{model}': model_type 'llava' is a multimodal model whose text "
        "model cap does not train yet (a llama decoder, under text_config; multimodal model_types cap trains: "
        "gemma3, mistral3): extract the text model into a folder of its own (its config.json = text_config, "
        f"weights without the language_model prefix); supported model_types: {', '.join(FAMILIES)}"
    )
