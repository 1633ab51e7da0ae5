"""The shared config: the reference README's defaults, and one clear line + exit 2 for each kind of error."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cap_common.config import Config, load_config, reference_markdown
from cap_common.errors import CapError
from cap_train.cli import main as train_main

MINIMAL = """
model_dir = '{model}'
output_dir = 'out'
lr = 2e-5
sequence_len = 64
lora_rank = 4
{extra}
[[datasets]]
dataset_path = 'data/*.json'
{dataset_extra}
"""


@pytest.fixture
def write(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")

    def make(extra="", dataset_extra="", text=None):
        if text is None:
            redefined = {line.split("=")[0].strip() for line in extra.splitlines() if "=" in line}
            base = "\n".join(line for line in MINIMAL.splitlines() if line.split("=")[0].strip() not in redefined)
            text = base.format(model=model, extra=extra, dataset_extra=dataset_extra)
        path = tmp_path / "cfg.toml"
        path.write_text(text)
        return path

    return make


def test_reference_readme_defaults(write):
    cfg = load_config(write())
    expected = {
        "epochs": 1,
        "beta1": 0.9,
        "beta2": 0.99,
        "eps": 1e-6,
        "pipeline_stages": 1,
        "use_control_adapters": False,
        "control_adapter_type": "full",
        "lora_dropout": 0.0,
        "lora_weight_decay": 0.0,
        "lora_weight_decay_type": "nuclear",
        "lora_max_norm": 0.0,
        "lora_weight_dtype": "float32",
        "target_modules": None,
        "layers_to_transform": None,
        "load_in_4bit": False,
        "full_fine_tune": False,
        "use_column_major_topology": False,
        "checkpoint_interval_hours": 1.0,
        "max_checkpoints": 3,
        "eval_fraction": 0.01,
        "evals_per_run": 11,
        "evals_per_epoch": None,
        "partition_method": "type:decoderlayer",
        "control_adapter_gamma": None,
        "document_prefix": None,
        "document_suffix": None,
        "max_sequences": None,
        "drop_tails": False,
        "mix_datasets": False,
        "sequence_prefix": None,
        "mask_tokens": False,
        "gradient_accumulation_steps": 1,
        # cap's own
        "control_adapter_target": "block",
        "seed": 42,
        "micro_batch_size": 1,
        "activation_checkpointing": True,
        "warmup": "rms_ratio",
        "lr_scheduler": "constant",
        "max_grad_norm": 1.0,
    }
    got = {k: getattr(cfg, k) for k in expected}
    assert got == expected
    assert cfg.alpha == pytest.approx(math.sqrt(4))  # rsLoRA default alpha
    assert cfg.eval_accumulation == cfg.gradient_accumulation_steps
    assert cfg.prepared_root == cfg.output_dir / "prepared"
    assert cfg.datasets[0].control_class == 1 and cfg.datasets[0].document_suffix is None
    assert cfg.datasets[0].document_prefix is None and cfg.datasets[0].max_tokens is None
    assert cfg.mode == "lora"
    # relative paths resolve against the config file's folder
    assert cfg.output_dir == (cfg.source.parent / "out").resolve()
    assert cfg.datasets[0].dataset_path == str(cfg.source.parent.resolve() / "data/*.json")


def test_frozen(write):
    cfg = load_config(write())
    with pytest.raises(Exception):
        cfg.lr = 1.0


@pytest.mark.parametrize(
    "extra, dataset_extra, expected",
    [
        ("layers_to_transform = '1:2'", "", {"layers_to_transform": (1, 2)}),
        ("layers_to_transform = [3, 0, 3]", "", {"layers_to_transform": (0, 3)}),
        ("layers_to_transform = '0:1, 3'", "", {"layers_to_transform": (0, 1, 3)}),
        ("target_modules = 'all-linear'", "", {"target_modules": None}),
        ("sequence_prefix = ''", "", {"sequence_prefix": ""}),
        ("sequence_prefix = 7", "", {"sequence_prefix": (7,)}),
        ("mask_tokens = [1, 2]", "", {"mask_tokens": (1, 2)}),
        ("mask_tokens = true", "", {"mask_tokens": True}),
        (
            "use_control_adapters = true\ncontrol_adapter_type = 'spectral'",
            "control_class = -1",
            {"mode": "control", "control_adapter_type": "spectral"},
        ),
        ("load_in_4bit = true", "", {"mode": "qlora"}),
        ("full_fine_tune = true", "", {"mode": "full"}),
        ("lora_alpha = 16\neval_gradient_accumulation_steps = 2", "", {"alpha": 16.0, "eval_accumulation": 2}),
    ],
)
def test_accepted_values(write, extra, dataset_extra, expected):
    cfg = load_config(write(extra, dataset_extra))
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_document_suffix_forms(write):
    for value, parsed in (("''", ""), ("'<EOT>'", "<EOT>"), ("5", (5,)), ("[5, 6]", (5, 6))):
        cfg = load_config(write(dataset_extra=f"document_suffix = {value}"))
        assert cfg.datasets[0].document_suffix == parsed


# (config change, the words the one-line message must contain)
ERRORS = [
    ("lora_rnak = 4", ["unknown key 'lora_rnak'", "did you mean 'lora_rank'"]),
    ("lr = 'fast'", ["lr = 'fast'", "expected a number"]),
    ("epochs = 1.5", ["epochs = 1.5", "expected an integer >= 1"]),
    ("eval_fraction = 1.5", ["eval_fraction = 1.5", "[0, 1)"]),
    ("lora_dropout = -0.1", ["lora_dropout", "[0, 1)"]),
    (
        "control_adapter_type = 'diagonal'\nuse_control_adapters = true",
        ["control_adapter_type = 'diagonal'", "'spectral'"],
    ),
    ("layers_to_transform = '5:2'", ["layers_to_transform = '5:2'", "first (5) is after last (2)"]),
    ("layers_to_transform = 'all'", ["layers_to_transform = 'all'", "'first:last'"]),
    ("layers_to_transform = '0:9'", ["layer 9 does not exist", "0:3"]),
    ("use_control_adapters = true\nfull_fine_tune = true", ["mutually exclusive"]),
    ("full_fine_tune = true\nload_in_4bit = true", ["mutually exclusive"]),
    ("use_control_adapters = true\ntarget_modules = ['q_proj']", ["target_modules is not allowed"]),
    ("lora_weight_decay = 10.0\nlora_weight_dtype = 'bfloat16'", ["needs lora_weight_dtype = 'float32'"]),
    ("lora_weight_dtype = 'float16'", ["'float16' is not supported", "use 'bfloat16'"]),
    ("drop_tails = 'yes'", ["drop_tails = 'yes'", "expected true or false"]),
    ("mask_tokens = 'eos'", ["mask_tokens = 'eos'", "token id"]),
    ("pipeline_stages = 8", ["pipeline_stages = 8", "more stages than the model's 4 layers"]),
    ("warmup = 'linear'", ["warmup_fraction > 0"]),
    ("control_adapter_target = 'writers'", ["needs use_control_adapters = true"]),
]


@pytest.mark.parametrize("extra, words", ERRORS, ids=[e[0].split("\n")[0] for e in ERRORS])
def test_errors_are_one_line_exit_2(write, extra, words):
    path = write(extra)
    result = CliRunner().invoke(train_main, [str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"cap-train: error: {path}")
    for w in words:
        assert w in lines[0]


@pytest.mark.parametrize(
    "dataset_extra, words",
    [
        ("control_class = 2", ["datasets[0]: control_class = 2", "expected one of 1, -1, 0"]),
        ("control_class = true", ["control_class = True", "expected one of"]),
        ("control_class = -1", ["classes -1 and 0 need use_control_adapters = true"]),
        ("document_suffix = 1.5", ["document_suffix = 1.5", "token id"]),
        ("dataset_pth = 'x'", ["datasets[0]: unknown key 'dataset_pth'", "did you mean 'dataset_path'"]),
    ],
)
def test_dataset_errors(write, dataset_extra, words):
    with pytest.raises(CapError) as e:
        load_config(write(dataset_extra=dataset_extra))
    for w in words:
        assert w in str(e.value)


DATASET = "[[datasets]]\ndataset_path = 'x'"


def test_missing_required_and_paths(write, tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama")
    cases = [
        (
            f"model_dir = '{model}'\noutput_dir = 'o'\nsequence_len = 8\nlora_rank = 2\n" + DATASET,
            "missing required key 'lr'",
        ),
        (
            f"model_dir = '{model}'\noutput_dir = 'o'\nlr = 1e-4\nsequence_len = 8\n[[datasets]]\ndataset_path = 'x'",
            "missing required key 'lora_rank'",
        ),
        (
            f"model_dir = '{model}'\noutput_dir = 'o'\nlr = 1e-4\nsequence_len = 8\nlora_rank = 2",
            "missing required key 'datasets'",
        ),
        (
            f"model_dir = '{tmp_path}/nope'\noutput_dir = 'o'\nlr = 1e-4\nsequence_len = 8\nlora_rank = 2\n" + DATASET,
            "model_dir = '" + f"{tmp_path}/nope': folder not found",
        ),
        (
            f"model_dir = '{tmp_path}'\noutput_dir = 'o'\nlr = 1e-4\nsequence_len = 8\nlora_rank = 2\n" + DATASET,
            "no config.json",
        ),
        ("lr = [", "invalid TOML"),
    ]
    for text, words in cases:
        path = write(text=text)
        with pytest.raises(CapError) as e:
            load_config(path)
        assert words in str(e.value) and str(path) in str(e.value)
    with pytest.raises(CapError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_world_size_check(write):
    cfg = load_config(write("pipeline_stages = 2"))
    assert cfg.check_world_size(4) == 2
    with pytest.raises(CapError, match="pipeline_stages = 2 must divide the world size"):
        cfg.check_world_size(3)


def test_reference_covers_every_key():
    table = reference_markdown()
    import dataclasses

    for f in dataclasses.fields(Config):
        if f.name not in ("source", "datasets"):
            assert f"`{f.name}`" in table
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert table in readme, "README's config reference is stale: regenerate with python -m cap_common.config"


@pytest.mark.parametrize("command", ["cap-prep", "cap-train", "cap-export"])
def test_console_scripts_help(command):
    exe = shutil.which(command) or str(Path(sys.executable).parent / command)
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout and "README" in out.stdout
