"""Document attention: a packed row of several documents, position_ids restarting at 0 in each,
computes for every token what transformers computes on that document alone.

    seg[t] = Σ_{t' ≤ t} [position_ids[t'] = 0];  query q sees key k iff seg[q] = seg[k], k ≤ q
             (and q − k < window on sliding layers)

The reference is transformers' AutoModelForCausalLM run on each document by itself; the same
packed rows without document attention (one causal row, positions 0..T−1) must differ from it by
far more than the tolerance. Checked on cap's pipeline layers outside DeepSpeed (1 and 2 stages,
every activation checkpointing mode), and through cap-train's eval at step 0 and its first train
loss, on 1 process and on 2 processes × 2 pipeline stages, from a prepared folder written here with
position_ids (cap_prep.shards, the on-disk contract).
"""

from __future__ import annotations

import datetime
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from cap_common.models import layers as model_layers
from cap_common.models.pipeline import build_pipeline_layers
from cap_common.models.spec import ModelSpec
from tests.assets import VOCAB_SIZE
from tests.test_train import finish, metrics, start_train, write_config


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP's waiting makes
    each forward many times slower; each test runs on one thread and restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


L = 32
# per row: the document lengths (their sum ≤ L; the rest is padding, its own segment). Several
# documents are longer than the tiny models' sliding window (8).
ROWS = [[10, 7, 12], [5, 14, 13], [20, 9], [3, 11, 9, 6], [32], [12, 12, 4], [9, 9, 9], [16, 15]]
PAD = 2


def packed_rows(seed: int, lengths=ROWS, classes=(1,)):
    """(input_ids [n,L] int32, control_class [n,L] int8, position_ids [n,L] int32, documents): each
    row its documents back to back, then padding; positions restart at 0 in every document and in
    the padding run; class 0 on each document's first token and on padding (as cap-prep writes),
    row r's documents class classes[r % len(classes)] elsewhere. documents[r] = [(start, ids [n])]."""
    g = np.random.default_rng(seed)
    ids = np.full((len(lengths), L), PAD, dtype=np.int32)
    cls = np.zeros((len(lengths), L), dtype=np.int8)
    pos = np.zeros((len(lengths), L), dtype=np.int32)
    documents = []
    for r, row in enumerate(lengths):
        start, docs = 0, []
        for n in row:
            doc = g.integers(3, VOCAB_SIZE, n).astype(np.int32)
            ids[r, start : start + n] = doc
            cls[r, start + 1 : start + n] = classes[r % len(classes)]
            pos[r, start : start + n] = np.arange(n)
            docs.append((start, doc))
            start += n
        pos[r, start:] = np.arange(L - start)
        documents.append(docs)
    return ids, cls, pos, documents


def reference(model_dir: Path, family: str):
    """transformers' float32 model of model_dir, with the attention cap runs for the family."""
    attention = "eager" if family == "gemma2" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attention
    )
    return model.eval()


@torch.no_grad()
def reference_token_losses(model, documents) -> list[torch.Tensor]:
    """Per row, the cross entropy of every next-token label within each document, each document run
    alone: [Σ_docs (n − 1)] in row order."""
    out = []
    for docs in documents:
        row = []
        for _, doc in docs:
            ids = torch.from_numpy(doc).long()[None]
            logits = model(input_ids=ids).logits[0].float()
            row.append(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="none"))
        out.append(torch.cat(row))
    return out


def token_losses(logits: torch.Tensor, documents) -> list[torch.Tensor]:
    """The same per-token losses from packed logits [n,L,V]: position start + j predicts doc[j + 1]."""
    out = []
    for r, docs in enumerate(documents):
        row = []
        for start, doc in docs:
            labels = torch.from_numpy(doc[1:]).long()
            row.append(F.cross_entropy(logits[r, start : start + len(labels)], labels, reduction="none"))
        out.append(torch.cat(row))
    return out


def spec_of(model_dir: Path, **keys) -> ModelSpec:
    return ModelSpec(model_dir=model_dir, dtype=torch.float32, mode="full", source=Path("test.toml"), **keys)


def run_layers(modules, inputs):
    x = inputs
    for m in modules:
        x = m(x)
    return x


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float(((g - w).abs() / w.abs()).max()) for g, w in zip(got, want))


# ---------------------------------------------------------------- the pipeline layers, outside DeepSpeed
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_packed_documents_match_each_document_alone(tiny_model_dir, family, monkeypatch):
    """Per token, loss(packed row with document attention) = loss(transformers, that document alone),
    rel 1e-4, on one stage and on two; without document attention the same comparison is off by
    far more. mistral: every layer sliding (window 8); gemma2: sliding and full layers, eager
    attention with logit softcapping. One mask per window per forward, not one per layer."""
    model_dir = tiny_model_dir(family)
    ids, cls, pos, documents = packed_rows(seed=1)
    inputs = (torch.from_numpy(ids).long(), torch.from_numpy(cls), torch.from_numpy(pos).long())
    want = reference_token_losses(reference(model_dir, family), documents)

    builds = []
    build = model_layers.document_mask
    monkeypatch.setattr(model_layers, "document_mask", lambda *a: builds.append(a[1]) or build(*a))
    spec = spec_of(model_dir, document_attention=True)
    with torch.no_grad():
        whole = run_layers(build_pipeline_layers(spec), inputs)
        assert rel_error(token_losses(whole, documents), want) < 1e-4
        windows = {None, 8} if family == "gemma2" else {8} if family == "mistral" else {None}
        assert sorted(builds, key=str) == sorted(windows, key=str)  # once per window, not per layer

        two = replace(spec, pipeline_stages=2)
        split = run_layers(build_pipeline_layers(two, stage=0) + build_pipeline_layers(two, stage=1), inputs)
        assert rel_error(token_losses(split, documents), want) < 1e-4

        # the test can fail: one causal row over all documents (cap without document attention)
        plain = run_layers(build_pipeline_layers(spec_of(model_dir)), inputs[:2])
        assert rel_error(token_losses(plain, documents), want) > 1e-2


@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_recompute_modes_keep_document_attention(tiny_model_dir, mode):
    """Every activation checkpointing mode gives the gradients of no checkpointing with document
    masks (a full fine-tune of tiny llama; mean loss over the packed rows' document tokens)."""
    model_dir = tiny_model_dir("llama")
    ids, cls, pos, documents = packed_rows(seed=2, lengths=ROWS[:2])
    inputs = (torch.from_numpy(ids).long(), torch.from_numpy(cls), torch.from_numpy(pos).long())

    def gradients(checkpointing):
        torch.manual_seed(0)
        spec = spec_of(model_dir, document_attention=True, activation_checkpointing=checkpointing)
        modules = build_pipeline_layers(spec)
        logits = run_layers(modules, inputs)
        torch.cat(token_losses(logits, documents)).mean().backward()
        return {f"{i}.{n}": p.grad for i, m in enumerate(modules) for n, p in m.named_parameters()}

    want, got = gradients(False), gradients(mode)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family, windows", [("llama", 1), ("gemma2", 2)])
def test_plan_counts_the_masks(tiny_model_dir, tmp_path, family, windows):
    """--plan adds, per stage, the document masks of its micro batches in flight under activations:
    in_flight · windows · B·T²·size, plus 2·B·T² bytes of boolean temporaries (gemma2: sliding and
    full layers, two masks); nothing without document_attention."""
    from cap_common.config import config_from_dict
    from cap_train.plan import make_plan

    def plan(**keys):
        raw = dict(
            model_dir=str(tiny_model_dir(family)),
            output_dir=str(tmp_path / "out"),
            lr=1e-4,
            sequence_len=64,
            micro_batch_size=2,
            gradient_accumulation_steps=4,
            pipeline_stages=2,
            lora_rank=4,
            model_dtype="bfloat16",
            datasets=[{"dataset_path": "x"}],
        )
        return make_plan(config_from_dict({**raw, **keys}, tmp_path / "cfg.toml"), 2, "cuda")

    on, off = plan(document_attention=True), plan(document_attention=False)
    B, T = 2, 64
    for s, (a, b) in enumerate(zip(on.stages, off.stages)):
        in_flight = min(2 - s, 4)
        mask = in_flight * windows * B * T * T * 2 + 2 * B * T * T
        assert a.masks == mask and b.masks == 0
        for field in ("activations", "activations_full", "activations_checkpointed"):
            assert getattr(a, field) - getattr(b, field) == mask
        assert a.peak() - b.peak() == mask
    assert on.document_attention and not off.document_attention


# ---------------------------------------------------------------- cap-train, 1 process and 2 × 2 stages
def write_prepared(cfg_path: Path, seed: int) -> tuple[list, list, np.ndarray]:
    """Write the prepared folder cap-train will look for (cap-prep's fingerprint of the config) by
    hand, with position_ids: 8 train and 8 eval rows. Returns (train documents, eval documents)."""
    from cap_common.config import load_config
    from cap_prep import cache
    from cap_prep.build import dataset_folder
    from cap_prep.shards import FORMAT_VERSION, ShardWriter, write_manifest

    cfg = load_config(cfg_path)
    folder = dataset_folder(cfg)
    folder.mkdir(parents=True)
    splits, docs = {}, {}
    for split, offset in (("train", 0), ("eval", 100)):
        ids, cls, pos, docs[split] = packed_rows(seed + offset, classes=(1, -1))
        writer = ShardWriter(folder, split, L, max_rows=5, positions=True)  # two shards per split
        writer.write(ids, cls, pos)
        shards = writer.close()
        tokens = int((ids != PAD).sum())
        splits[split] = {
            "sequences": len(ids),
            "sequences_before_max": len(ids),
            "tokens": tokens,
            "masked_tokens": 0,
            "prefix_tokens": 0,
            "padding_tokens": int(ids.size - tokens),
            "loss_tokens": {"+1": int((cls == 1).sum()), "-1": int((cls == -1).sum())},
            "dropped_tails": 0,
            "dropped_tail_tokens": 0,
            "shards": shards,
        }
    write_manifest(
        folder,
        {
            "format_version": FORMAT_VERSION,
            "fingerprint": folder.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sequence_len": L,
            "tokenizer": {"name": "tiny", "vocab_size": VOCAB_SIZE, "bos_id": 0, "eos_id": 1, "pad_id": PAD},
            "prefix_ids": [],
            "mask_ids": [],
            "prep_config": cache.prep_keys(cfg),
            "document_attention": True,
            "datasets": [],
            "splits": splits,
        },
    )
    assert cache.is_complete(folder)
    return docs["train"], docs["eval"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """{name: (output_dir, train documents, eval documents)}: one training step and the eval at step
    0 on 1 process, and on 2 processes × 2 stages ('selective' checkpointing there)."""
    model = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("documents")
    keys = dict(
        use_control_adapters=True, sequence_len=L, max_steps=1, evals_per_run=1, seed=3, document_attention=True
    )
    one = write_config(root / "one", model, **keys)
    two = write_config(root / "two", model, pipeline_stages=2, activation_checkpointing="selective", **keys)
    data = {name: write_prepared(cfg, seed=11) for name, cfg in (("one", one), ("two", two))}
    finish(start_train(one, 1), start_train(two, 2))
    return {name: (root / name / "out", *data[name]) for name in data}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one", "two"])
def test_cap_train_losses_are_per_document(trained, tiny_model_dir, name):
    """cap-train's eval loss at step 0 (overall and per class) is the token mean of transformers'
    per-document losses over the eval rows, and its first train loss the mean over the step's two
    micro batches of their token means (rows: the first 4 of the seed's PCG64 permutation of epoch
    0, consecutive pairs); rel 1e-4. Without document attention the eval loss is off by 10× that or more."""
    out, train_docs, eval_docs = trained[name]
    model = reference(tiny_model_dir("llama"), "llama")
    rows = metrics(out)
    per_row = reference_token_losses(model, eval_docs)
    loss = torch.cat(per_row).mean()
    by_class = {c: torch.cat([t for r, t in enumerate(per_row) if (1, -1)[r % 2] == c]).mean() for c in (1, -1)}
    assert rows[0]["eval/loss_all"] == pytest.approx(float(loss), rel=1e-4)
    assert rows[0]["eval/loss_class+1"] == pytest.approx(float(by_class[1]), rel=1e-4)
    assert rows[0]["eval/loss_class-1"] == pytest.approx(float(by_class[-1]), rel=1e-4)

    perm = np.random.Generator(np.random.PCG64([3, 0])).permutation(len(train_docs))
    train = reference_token_losses(model, [train_docs[i] for i in perm[:4]])
    micro = [torch.cat(train[0:2]).mean(), torch.cat(train[2:4]).mean()]
    assert rows[1]["train/loss"] == pytest.approx(float(sum(micro) / 2), rel=1e-4)

    ids, cls, _, _ = packed_rows(11 + 100, classes=(1, -1))
    with torch.no_grad():
        causal = model(input_ids=torch.from_numpy(ids).long()).logits.float()
    plain = torch.cat(token_losses(causal, eval_docs)).mean()
    assert abs(float(plain) / rows[0]["eval/loss_all"] - 1) > 10 * 1e-4  # measured: 20× the tolerance
