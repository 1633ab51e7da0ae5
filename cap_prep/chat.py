"""Conversation data: records → messages → the model's chat template → token ids and trained tokens.

Formats (a record is one JSON object or Parquet row; field names as below unless `fields` renames them):
- `messages`           {"messages": [{"role", "content", optional "train": bool}, ...]}  (OpenAI style)
- `sharegpt`           {"conversations": [{"from", "value"}, ...]}, its roles mapped (human → user, gpt → assistant)
- `alpaca`             {"instruction", "input" (optional), "output", "system" (optional)}
                       → [system], user: instruction + "\\n\\n" + input, assistant: output
- `prompt_completion`  {"prompt", "completion"}: strings (→ user, assistant) or lists of messages
`auto` picks the format from the first record's fields; `text` is raw text (sources.py).

A conversation's tokens are the template's, exactly as transformers' `apply_chat_template(messages,
tokenize=True)` makes them: the template rendered (transformers' renderer, the tokenizer's special
tokens as variables), then tokenized without added special tokens. Its trained tokens are those of the
turns whose role is in `train_roles` (or whose message says `"train": true`): from the first character
of the message's content to its end, plus the end-of-turn token the template writes right after it
(an added token, after whitespace at most). A token trains when its characters overlap a trained span
(transformers' rule for its assistant masks). The spans are found in one render, with private-use
marker characters around each trained message's content (inside its leading and trailing whitespace,
so a template's `trim` acts as on the plain text); where the markers do not come back in order, or the
template renders the marked conversation otherwise than the plain one (checked on each dataset's first
conversations), the spans come from renders of the conversation's prefixes instead.

Which tokens overlap a span is read from the tokenizer's character offsets, or, for byte-level BPE
(`byte_lengths`), from each token's length in bytes: its tokens' bytes are the text's bytes, in order,
so a token covers [Σ lengths before it, + its length) and the tokenizer can run without offsets
(`encode_batch_fast`; offsets cost 12–38% of its time in benchmarks/bench_prep.py). The byte path is
used once a dataset's first batch, tokenized with offsets, gives the same trained tokens both ways; a
later conversation whose token bytes do not add up to its text's is tokenized again with offsets.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cap_common.errors import CapError
from cap_prep.tokenize import _ids, check_ids, flat_ids

CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
_START, _END = "\uf8f0", "\uf8f1"  # private-use markers around trained contents
CHECKED_CONVERSATIONS = 32  # per dataset, marked renders compared with plain ones


# ---------------------------------------------------------------- records → messages
@dataclass
class Conversation:
    """One record's messages (each a dict the template reads; `train` says whether it trains) and where it is."""

    messages: list[dict]
    train: list[bool]
    where: str


class Fields:
    """Field names of one dataset's records: cap's name → the name in the data."""

    def __init__(self, renames: tuple[tuple[str, str], ...] | None):
        self.names = dict(renames or ())

    def __getitem__(self, name: str) -> str:
        return self.names.get(name, name)


def detect_format(keys, fields: Fields) -> str:
    """The format a record with these keys (or a Parquet file with these columns) is in."""
    keys = set(keys)
    if fields["messages"] in keys:
        return "messages"
    if fields["conversations"] in keys:
        return "sharegpt"
    if fields["instruction"] in keys and fields["output"] in keys:
        return "alpaca"
    if fields["prompt"] in keys and fields["completion"] in keys:
        return "prompt_completion"
    return "text"


def record_fields(fmt: str, fields: Fields) -> tuple[list[str], list[str]]:
    """(required, optional) top-level fields of a record in format `fmt`."""
    f = fields
    return {
        "text": ([f["text"]], []),
        "messages": ([f["messages"]], []),
        "sharegpt": ([f["conversations"]], []),
        "alpaca": ([f["instruction"], f["output"]], [f["input"], f["system"]]),
        "prompt_completion": ([f["prompt"], f["completion"]], []),
    }[fmt]


def _string(record: dict, name: str, where: str, optional: bool = False) -> str | None:
    value = record.get(name)
    if value is None and optional:
        return None
    if name not in record:
        keys = ", ".join(list(record)[:6]) or "none"
        raise CapError(f'{where}: no "{name}" field (fields: {keys})')
    if not isinstance(value, str):
        raise CapError(f'{where}: "{name}" is {type(value).__name__}, expected a string')
    return value


def _message_list(record: dict, name: str, where: str) -> list:
    if name not in record:
        raise CapError(f'{where}: no "{name}" field (fields: {", ".join(list(record)[:6]) or "none"})')
    value = record[name]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise CapError(f'{where}: "{name}" is {type(value).__name__}, expected a list of message objects')
    return value


_SAME_ROLES = {r: r for r in ROLES}


def _messages(items: list, fields: Fields, where: str, role_key: str, content_key: str, roles: dict | None) -> list:
    """(message as the template reads it: role, content and any other fields but None ones and `train`;
    its train flag or None) per item. A plain {"role", "content"} message is used as it is."""
    roles = roles or _SAME_ROLES
    plain = role_key == "role" and content_key == "content" and roles is _SAME_ROLES
    out = []
    for i, m in enumerate(items):
        role, content = m.get(role_key), m.get(content_key)
        mapped = roles.get(role) if isinstance(role, str) else None
        if plain and mapped is not None and type(content) is str and len(m) == 2:
            out.append((m, None))  # the common case, checked: nothing to copy
            continue
        at = f"{where}: message {i}"
        if role_key not in m:
            raise CapError(f'{at}: no "{role_key}" field (fields: {", ".join(list(m)[:6]) or "none"})')
        if mapped is None:
            raise CapError(f"{at}: unknown role {role!r} (expected one of {', '.join(roles)})")
        if content is None and mapped == "assistant" and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            what = "missing" if content_key not in m else type(content).__name__
            raise CapError(f'{at}: "{content_key}" is {what}, expected a string')
        message = {k: v for k, v in m.items() if v is not None and k not in (role_key, content_key, fields["train"])}
        message["role"], message["content"] = mapped, content
        train = m.get(fields["train"])
        if train is not None and not isinstance(train, bool):
            raise CapError(f'{at}: "{fields["train"]}" is {type(train).__name__}, expected true or false')
        out.append((message, train))
    return out


def to_conversation(record, fmt: str, fields: Fields, train_roles: tuple[str, ...], where: str) -> Conversation:
    """The Conversation of one record in format `fmt`; CapError naming `where` for a record that is not one."""
    if not isinstance(record, dict):
        raise CapError(f"{where}: expected an object, got {type(record).__name__}")
    f = fields
    if fmt == "messages":
        items = _message_list(record, f["messages"], where)
        pairs = _messages(items, f, where, f["role"], f["content"], None)
    elif fmt == "sharegpt":
        items = _message_list(record, f["conversations"], where)
        pairs = _messages(items, f, where, f["from"], f["value"], SHAREGPT_ROLES)
    elif fmt == "alpaca":
        system = _string(record, f["system"], where, optional=True)
        instruction = _string(record, f["instruction"], where)
        extra = _string(record, f["input"], where, optional=True)
        user = instruction + ("\n\n" + extra if extra else "")
        pairs = ([({"role": "system", "content": system}, None)] if system else []) + [
            ({"role": "user", "content": user}, None),
            ({"role": "assistant", "content": _string(record, f["output"], where)}, None),
        ]
    elif fmt == "prompt_completion":
        pairs = []
        for name, role in ((f["prompt"], "user"), (f["completion"], "assistant")):
            value = record.get(name)
            if isinstance(value, list):
                pairs += _messages(_message_list(record, name, where), f, where, f["role"], f["content"], None)
            else:
                pairs.append(({"role": role, "content": _string(record, name, where)}, None))
    else:
        raise ValueError(fmt)
    messages = [m for m, _ in pairs]
    train = [m["role"] in train_roles if t is None else t for m, t in pairs]
    return Conversation(messages, train, where)


# ---------------------------------------------------------------- the template
def load_template(tok, override: Path | None, model_dir: Path) -> str:
    """The Jinja chat template: the file `override`, else the tokenizer's (tokenizer_config.json's
    chat_template or chat_template.jinja, as transformers loads them)."""
    if override is not None:
        try:
            return override.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CapError(f"chat_template = {override}: cannot read ({e})") from None
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise CapError(
            f"model_dir {model_dir}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' "
            "or chat_template.jinja); conversation data needs one: set chat_template = 'path/to/template.jinja'"
        )
    return template


class ChatEncoder:
    """Renders one dataset's conversations and tokenizes them: ids and a trained flag per token.

    `text_and_spans(conversation)` (the reader), `encode_texts(rendered)` (the tokenizer thread) and
    `to_arrays(...)` (the caller) split the work as tokenize.DocumentEncoder does; `to_arrays` gives
    (flat ids [T] int32, lengths [n] int64, trained [T] int8, skipped), a conversation without a
    trained token being skipped.
    """

    def __init__(self, tok, template: str, document_suffix, vocab_size: int, where: str):
        """document_suffix: None or '' nothing; a string (tokenized alone) or id(s) after each conversation,
        trained when its last token is."""
        from transformers.utils.chat_template_utils import render_jinja_template

        self.render_many, self.template = render_jinja_template, template
        self.compiled = _compiled(template)
        self.variables = dict(tok.special_tokens_map)
        self.backend = tok.backend_tokenizer
        where = f"{where}: document_suffix = {document_suffix!r}"
        if isinstance(document_suffix, str):
            document_suffix = self.backend.encode(document_suffix, add_special_tokens=False).ids
        self.suffix_ids = check_ids(_ids(document_suffix), vocab_size, where)
        added = sorted((t.content for t in self.backend.get_added_tokens_decoder().values()), key=len, reverse=True)
        self.end_of_turn = re.compile(r"\s*(" + "|".join(map(re.escape, added)) + ")") if added else None
        self.eos = tok.eos_token
        self.byte_length = byte_lengths(self.backend)  # [vocab] bytes per token, or None (offsets only)
        # None until the first batch compares the two ways; False at once without byte lengths
        self.by_bytes: bool | None = None if self.byte_length is not None else False
        self.checked = 0  # conversations whose marked render was compared with the plain one
        self.markers_work = True
        self.seen_end_of_turn: str | None = None

    # ------------------------------------------------------------ rendering
    def render(self, messages: list[dict], where: str, generation_prompt: bool = False) -> str:
        import jinja2

        try:
            if self.compiled is not None and not any(_REASONING.intersection(m) for m in messages):
                # what render_jinja_template does for messages of plain JSON values without reasoning fields
                return self.compiled.render(
                    messages=messages,
                    tools=None,
                    documents=None,
                    add_generation_prompt=generation_prompt,
                    **self.variables,
                )
            (text,), _ = self.render_many(
                [messages], chat_template=self.template, add_generation_prompt=generation_prompt, **self.variables
            )
        except jinja2.TemplateError as e:
            raise CapError(f"{where}: the chat template failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template is user code: any failure is about this record
            raise CapError(f"{where}: the chat template failed ({type(e).__name__}: {e})") from None
        return text

    def text_and_spans(self, c: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text of `c` and the character spans [start, end) of its trained turns."""
        if self.markers_work and not any(_START in m["content"] or _END in m["content"] for m in c.messages):
            found = self._marked(c)
            if found is not None:
                return found
        return self._by_prefixes(c)

    def _marked(self, c: Conversation):
        """text_and_spans from one render with the trained contents between markers; None when the
        markers do not come back once each, in order (or, on the first conversations, the text differs
        from the plain render)."""
        marked, n = [], 0
        for m, train in zip(c.messages, c.train):
            content = m["content"]
            core = content.strip()
            if train and core:
                lead = content[: len(content) - len(content.lstrip())]
                m = {**m, "content": lead + _START + core + _END + content[len(lead) + len(core) :]}
                n += 1
            elif train:  # an empty trained turn: only the prefix renders find its end-of-turn token
                return None
            marked.append(m)
        rendered = self.render(marked, c.where)
        if rendered.count(_START) != n or rendered.count(_END) != n:
            return None
        pieces, ends, at = [], [], 0
        for i in range(n):
            start = rendered.find(_START, at)
            end = rendered.find(_END, start)
            if start < 0 or end < 0 or rendered.find(_START, start + 1, end) >= 0:
                return None
            pieces += [rendered[at:start], rendered[start + 1 : end]]
            ends.append((start - 2 * i, end - 1 - 2 * i))  # in the text without the markers
            at = end + 1
        pieces.append(rendered[at:])
        text = "".join(pieces)
        if self.checked < CHECKED_CONVERSATIONS:
            self.checked += 1
            if text != self.render(c.messages, c.where):
                self.markers_work = False
                return None
        return text, [(start, self._turn_end(text, content_end)) for start, content_end in ends]

    def _turn_end(self, text: str, content_end: int) -> int:
        """Where a trained turn ends: after the added token (end of turn) right after its content, if any."""
        m = self.end_of_turn.match(text, content_end) if self.end_of_turn else None
        if m is None:
            return content_end
        if self.seen_end_of_turn is None:
            self.seen_end_of_turn = m.group(1)
        return m.end()

    def _by_prefixes(self, c: Conversation):
        """Spans from renders of the conversation's prefixes: turn i trains from its content (its first
        non-space character, found after the render of messages[:i]; an assistant turn with no content
        from the end of the generation prompt) to the end of the render of messages[:i+1] (its trailing
        whitespace excluded); both renders must be prefixes of the whole one."""
        text = self.render(c.messages, c.where)
        spans = []
        for i, train in enumerate(c.train):
            if not train:
                continue
            head = self.render(c.messages[:i], c.where) if i else ""
            upto = self.render(c.messages[: i + 1], c.where).rstrip()
            if not (text.startswith(head) and text.startswith(upto) and len(head) <= len(upto)):
                raise CapError(
                    f"{c.where}: message {i}: the chat template renders this turn differently when it is the last "
                    "one, so its tokens cannot be found"
                )
            core = c.messages[i]["content"].strip()
            start = text.find(core, len(head), len(upto)) if core else -1
            if start < 0 and c.messages[i]["role"] == "assistant":
                prompt = self.render(c.messages[:i], c.where, generation_prompt=True) if i else ""
                start = len(prompt) if text.startswith(prompt) else len(head)
            start = max(start, len(head))
            if len(upto) > start:
                spans.append((start, len(upto)))
                m = self.end_of_turn.search(text, start, len(upto)) if self.end_of_turn else None
                if m is not None and self.seen_end_of_turn is None and m.end() == len(upto):
                    self.seen_end_of_turn = m.group(1)
        return text, spans

    # ------------------------------------------------------------ batches
    def encode_texts(self, rendered: list[tuple[str, list[tuple[int, int]]]]):
        """Tokenize rendered conversations, (text, spans) from text_and_spans (the tokenizer thread, without
        the GIL, while the reader renders the next batch): (encodings, texts, spans, with offsets?)."""
        texts = [t for t, _ in rendered]
        offsets = not self.by_bytes
        encode = self.backend.encode_batch if offsets else self.backend.encode_batch_fast
        return (encode(texts, add_special_tokens=False) if texts else []), texts, [s for _, s in rendered], offsets

    def to_arrays(self, encodings, texts, spans, offsets: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        flat, lengths = flat_ids(encodings)
        edges = np.concatenate([[0], np.cumsum(lengths)])  # conversation k's tokens: flat[edges[k]:edges[k+1]]
        if offsets:
            trained = np.concatenate([trained_tokens(e, s) for e, s in zip(encodings, spans)] or [np.zeros(0, np.int8)])
            if self.by_bytes is None:  # the first batch: does the byte path find the same tokens?
                by_bytes, bad = self._by_bytes(flat, edges, texts, spans)
                self.by_bytes = not bad.any() and np.array_equal(by_bytes, trained)
        else:
            trained, bad = self._by_bytes(flat, edges, texts, spans)
            for k in np.flatnonzero(bad):  # bytes that do not add up: this one with offsets
                e = self.backend.encode(texts[k], add_special_tokens=False)
                trained[edges[k] : edges[k + 1]] = trained_tokens(e, spans[k])
        return self._documents(flat, edges, trained)

    def _by_bytes(self, flat, edges, texts, spans) -> tuple[np.ndarray, np.ndarray]:
        """Trained flags [T] int8 of a batch from its tokens' byte lengths, and [n] bool: conversations whose
        token bytes do not add up to their text's (their flags are not set)."""
        size = self.byte_length[flat]
        end = np.cumsum(size)
        start = end - size
        first = np.concatenate([[0], end])[edges]  # each conversation's first byte in the batch
        ascii_ = [t.isascii() for t in texts]  # character positions are byte positions
        expected = np.fromiter((len(t) if a else len(t.encode()) for t, a in zip(texts, ascii_)), np.int64, len(texts))
        bad = first[1:] - first[:-1] != expected
        bounds, counts = [], np.zeros(len(texts), np.int64)
        for k in np.flatnonzero(~bad):
            text, sp = texts[k], spans[k]
            bounds += sp if ascii_[k] else [(len(text[:a].encode()), len(text[:b].encode())) for a, b in sp]
            counts[k] = len(sp)
        at = np.array(bounds, dtype=np.int64).reshape(-1, 2) + np.repeat(first[:-1], counts)[:, None]
        # a token [s, e) trains when e > a and s < b: from the first token ending after a to the last starting before b
        change = np.zeros(len(flat) + 1, np.int32)
        np.add.at(change, np.searchsorted(end, at[:, 0], side="right"), 1)
        np.add.at(change, np.searchsorted(start, at[:, 1], side="left"), -1)
        return (np.cumsum(change[:-1]) > 0).astype(np.int8), bad

    def _documents(self, flat, edges, trained) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(ids, lengths, trained, skipped): conversations without a trained token dropped, the document
        suffix after each (trained if the conversation's last token is)."""
        lengths = np.diff(edges)
        counted = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])
        keep = counted[edges[1:]] > counted[edges[:-1]]
        skipped = int((~keep).sum())
        suffix = len(self.suffix_ids)
        if not suffix and keep.all():
            return flat, lengths, trained, 0
        ids, flags = [], []
        for k in np.flatnonzero(keep):
            a, b = edges[k], edges[k + 1]
            ids += [flat[a:b], self.suffix_ids]
            flags += [trained[a:b], np.full(suffix, trained[b - 1], dtype=np.int8)]  # trains if the last turn does
        if not ids:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int8), skipped
        return np.concatenate(ids), lengths[keep] + suffix, np.concatenate(flags), skipped

    def note_end_of_turn(self, where: str) -> None:
        """One line when the template ends trained turns with a token other than the tokenizer's EOS."""
        eot = self.seen_end_of_turn
        if eot is not None and self.eos is not None and eot != self.eos:
            print(
                f"cap-prep: note: {where}: the chat template ends a turn with {eot!r} but the tokenizer's EOS is "
                f"{self.eos!r}: generation stops at {self.eos!r} unless generation_config.json's eos_token_id "
                f"lists {eot!r} too (the model learns to end its turns with {eot!r})",
                file=sys.stderr,
                flush=True,
            )


_REASONING = {"reasoning_content", "thinking", "reasoning"}  # fields transformers copies under each other's names


def _compiled(template: str):
    """The template compiled in an overlay of transformers' Jinja environment (its sandbox, filters and
    globals) whose sandbox check remembers its verdicts; None where this transformers has no
    _compile_jinja_template; CapError for a template that does not parse."""
    import jinja2
    from transformers.utils import chat_template_utils

    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    try:
        if compile_template is None:
            return None
        env = compile_template(template).environment.overlay()
    except jinja2.TemplateSyntaxError as e:
        raise CapError(f"chat template: line {e.lineno}: {e.message}") from None
    env.__class__ = _remembering(type(env))
    return env.from_string(template)


def _remembering(sandbox: type) -> type:
    """`sandbox` whose is_safe_attribute(obj, attr, value) is computed once per (type(obj), attr, type(value)):
    Jinja's sandboxes decide from those alone (the attribute's name, the object's and value's kinds), and
    asking again for every `loop.first` or `ns.x` of every render was a third of rendering's time."""

    def is_safe_attribute(self, obj, attr, value):
        key = (type(obj), attr, type(value))
        safe = self._safe_attributes.get(key)
        if safe is None:
            safe = self._safe_attributes[key] = sandbox.is_safe_attribute(self, obj, attr, value)
        return safe

    members = {"is_safe_attribute": is_safe_attribute, "_safe_attributes": {}}
    return type(f"Remembering{sandbox.__name__}", (sandbox,), members)


_BYTE_PRESERVING = {"ByteLevel", "Split", "Digits", "Punctuation"}  # pre-tokenizers that only cut the text


def byte_lengths(backend) -> np.ndarray | None:
    """[vocab] int64: each token's length in UTF-8 bytes, for a tokenizer whose tokens' bytes are exactly the
    text's (byte-level BPE: no normalizer, pre-tokenizers that only split, with ByteLevel adding no prefix
    space, and added tokens that strip nothing); None for any other."""
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (
        spec.get("normalizer") is not None
        or (spec.get("model") or {}).get("type") != "BPE"
        or not any(p.get("type") == "ByteLevel" for p in steps)
        or any(p.get("type") not in _BYTE_PRESERVING or p.get("add_prefix_space") for p in steps)
        or any(p.get("behavior") == "Removed" for p in steps)
        or any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens", []))
    ):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    out = np.zeros(max([*vocab.values(), *added, -1]) + 1, dtype=np.int64)
    for token, i in vocab.items():
        out[i] = len(token)  # one character of the byte-level alphabet per byte
    for i, token in added.items():
        out[i] = len(token.content.encode())
    return out


def trained_tokens(encoding, spans: list[tuple[int, int]]) -> np.ndarray:
    """[T] int8: 1 for the tokens whose characters [s, e) overlap a span [a, b) (e > a and s < b), spans
    sorted and disjoint. Tokens are in text order, so the tokens of a span are a run: from the first
    token holding character a to the last one starting before b (found through the encoding's
    char_to_token, not all offsets); every offset is read where a character is covered by no token."""
    n = len(encoding)
    out = np.zeros(n, dtype=np.int8)
    for a, b in spans:
        first = encoding.char_to_token(a)
        after = encoding.char_to_token(b)
        if first is None or (after is None and encoding.char_to_token(b - 1) is None):
            return _trained_by_offsets(np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2), spans)
        if after is None:  # b is past the end of the text, or its character has no token: up to b - 1's
            last = encoding.char_to_token(b - 1)
            while last + 1 < n and encoding.token_to_chars(last + 1)[0] < b:
                last += 1
        else:  # the tokens before the one holding b end by b; that one overlaps if it starts before b
            last = after if encoding.token_to_chars(after)[0] < b else after - 1
        out[first : last + 1] = 1
    return out


def _trained_by_offsets(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """trained_tokens from all offsets [T, 2]: a token trains when e > a and s < b for some span."""
    out = np.zeros(len(offsets), dtype=np.int8)
    if not spans or not len(offsets):
        return out
    a = np.array([s for s, _ in spans], dtype=np.int64)
    b = np.array([e for _, e in spans], dtype=np.int64)
    k = np.searchsorted(b, offsets[:, 0], side="right")  # the first span ending after the token starts
    ok = k < len(b)
    out[ok] = offsets[ok, 1] > a[k[ok]]
    return out


class Extract:
    """The documents of one dataset's records: raw text, or Conversations. With format 'auto' the
    first record's fields decide (sources.read_documents calls this for each record)."""

    def __init__(self, fmt: str, fields: Fields, train_roles: tuple[str, ...]):
        self.format = None if fmt == "auto" else fmt
        self.fields, self.train_roles = fields, train_roles

    def __call__(self, record, where: str):
        if self.format is None:
            self.format = detect_format(record if isinstance(record, dict) else (), self.fields)
        if self.format == "text":
            from cap_prep.sources import _text_of

            return _text_of(record, where, self.fields["text"])
        return to_conversation(record, self.format, self.fields, self.train_roles, where)

    def columns(self, names: list[str]) -> list[str]:
        """The Parquet columns to read of those a file has (the format decided from them if 'auto')."""
        if self.format is None:
            self.format = detect_format(names, self.fields)
        required, optional = record_fields(self.format, self.fields)
        missing = [c for c in required if c not in names]
        if missing:
            raise CapError(f'no "{missing[0]}" column (columns: {", ".join(names[:8])})')
        return required + [c for c in optional if c in names]

    @property
    def conversations(self) -> bool:
        return self.format in CONVERSATION_FORMATS
