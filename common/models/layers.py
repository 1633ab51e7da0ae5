"""The pipeline model's layers: embedding → decoder layers → final norm + LM head.

Every layer maps a tuple of tensors to a tuple of tensors (what DeepSpeed's pipeline sends between
stages); between layers flows

    (hidden [B,T,H], position_ids [B,T] long, classes [B,T], labels [B,T] long)

The first layer takes (input_ids [B,T], control_class [B,T]) straight from cap-prep's shards, and
with document attention their position_ids [B,T] too (each token's position in its document).
Rotary embeddings and the causal / sliding-window masks are recomputed in each decoder layer from
position_ids and T (masks are cached per shape, document masks per position_ids tensor), so nothing
else needs to cross a stage boundary. Sequences may end in padding (class 0): a causal mask keeps
every real position from seeing it, so no padding mask is needed; pad positions produce unused
outputs and carry label −100.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch
from torch import nn

IGNORE = -100


def labels_and_classes(input_ids: torch.Tensor, control_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position t, the label it predicts and that label's class (the shift by one):

        classes[t] = control_class[t+1]                 (last position: 0)
        labels[t]  = input_ids[t+1] if classes[t] != 0 else −100

    input_ids, control_class: [B,T] → labels [B,T] long, classes [B,T] (control_class's dtype).
    """
    classes = torch.zeros_like(control_class)
    classes[:, :-1] = control_class[:, 1:]
    labels = torch.full_like(input_ids, IGNORE, dtype=torch.long)
    labels[:, :-1] = input_ids[:, 1:]
    labels = labels.masked_fill(classes == 0, IGNORE)
    return labels, classes


@functools.lru_cache(maxsize=16)
def causal_mask(
    seq_len: int, window: int | None, attention: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Mask [1,1,T,T] letting query q see key k iff k ≤ q (and q − k < window for sliding layers).

    sdpa: boolean (True = attend); a full causal sdpa layer gets None, which sdpa runs as
    is_causal=True (its fastest kernels). eager: additive, 0 or the dtype's minimum — eager
    attention with no mask is *not* causal, so it always gets one.
    """
    if attention == "sdpa" and window is None:
        return None
    q = torch.arange(seq_len, device=device)[:, None]
    k = torch.arange(seq_len, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None, None]
    if attention == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def document_mask(position_ids: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B,1,T,T] of packed documents: query q sees key k iff both are in the same
    segment, k ≤ q, and (sliding layers) q − k < window, where a segment is a maximal run of
    position_ids starting at a 0:

        seg[b,t] = Σ_{t' ≤ t} [position_ids[b,t'] = 0],   mask = 0 if allowed else dtype's minimum

    Additive in the hidden dtype for sdpa too: sdpa turns a boolean mask into such a tensor on every
    call and keeps that copy for backward, one per layer; this one is shared by the stage's layers.
    """
    B, T = position_ids.shape
    seg = torch.cumsum(position_ids == 0, dim=1)
    t = torch.arange(T, device=position_ids.device)
    allowed = (t[None, :] <= t[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    if window is not None:
        allowed &= (t[None, :] > t[:, None] - window)[None]
    mask = torch.zeros((B, 1, T, T), dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


class _DocumentMasks:
    """document_mask per live position_ids tensor: built once per micro batch and stage, not per layer.

    Keyed on the tensor object itself (a weak reference, and its version counter), never on its
    address: a later micro batch may reuse the memory. An entry goes when its tensor is freed."""

    def __init__(self):
        self.entries: list[tuple[weakref.ref, int, tuple, torch.Tensor]] = []

    def get(self, position_ids: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        key = (window, dtype)
        for ref, version, k, mask in list(self.entries):
            if ref() is position_ids and version == position_ids._version and k == key:
                return mask
        mask = document_mask(position_ids, window, dtype)
        self.entries.append((weakref.ref(position_ids, self._drop), position_ids._version, key, mask))
        return mask

    def _drop(self, ref: weakref.ref) -> None:
        self.entries = [e for e in self.entries if e[0] is not ref]


document_masks = _DocumentMasks()


class EmbeddingPipe(nn.Module):
    """(input_ids, control_class[, position_ids]) → (embed(input_ids)·scale·multiplier, position_ids,
    classes, labels); position_ids [B,T] default to 0..T−1 in every row."""

    def __init__(self, embed: nn.Embedding, scale: float | None = None, multiplier: float | None = None):
        super().__init__()
        self.embed = embed
        self.scale = scale  # Gemma: √H, rounded to the weight dtype as transformers does
        self.multiplier = multiplier  # Granite: a Python float, as transformers multiplies

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        input_ids, control_class = inputs[:2]
        labels, classes = labels_and_classes(input_ids, control_class)
        hidden = self.embed(input_ids)
        if self.scale is not None:
            hidden = hidden * torch.tensor(self.scale, dtype=hidden.dtype, device=hidden.device)
        if self.multiplier is not None:
            hidden = hidden * self.multiplier
        if torch.is_grad_enabled() and not hidden.requires_grad:
            # A frozen embedding still has to hand the next stage something to backpropagate into.
            hidden.requires_grad_(True)
        if len(inputs) > 2:  # document attention: each token's position in its document
            position_ids = inputs[2].long()
        else:
            B, T = input_ids.shape
            position_ids = torch.arange(T, device=input_ids.device).repeat(B, 1)
        return hidden, position_ids.contiguous(), classes, labels  # p2p sends need contiguous


class _Classes:
    """Per-token classes of the current call, set by a DecoderLayerPipe for its writers to read."""

    value: torch.Tensor | None = None


class WriterAdapter(nn.Module):
    """A residual writer (o_proj, down_proj, Mixtral's experts) whose output o gets the adapter:

        o' = o + c·W'·o            (bias excluded: o' = b + adapter(o − b); for GPT-OSS's experts
                                    b = Σ_k w_k·b_{e_k}, the routed experts' biases as the router weighed them)

    which is what replacing the writer's weight M by (I + c·W')·M computes, the exported
    multiplicative LoRA. The adapter is the decoder layer's, shared by its writers; the classes
    are those the layer set for this call, reshaped to the output's leading dimensions.
    """

    def __init__(self, base: nn.Module, adapter: nn.Module, classes: _Classes):
        super().__init__()
        self.base = base
        # Not registered here: the adapter's parameters belong to the decoder layer.
        self.__dict__["adapter"] = adapter
        self.__dict__["classes"] = classes

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.base(*args, **kwargs)
        classes = self.classes.value.reshape(out.shape[:-1])
        bias = getattr(self.base, "bias", None)
        expert_bias = getattr(self.base, "down_proj_bias", None)
        if isinstance(expert_bias, torch.Tensor):  # GPT-OSS's experts: b = Σ_k w_k · b_{e_k} per token
            indices, weights = args[1:3] if len(args) >= 3 else (kwargs["router_indices"], kwargs["routing_weights"])
            bias = (weights.unsqueeze(-1) * expert_bias[indices]).sum(-2).to(out.dtype)
        if isinstance(bias, torch.Tensor):
            return bias + self.adapter(out - bias, classes)
        return self.adapter(out, classes)


class DecoderLayerPipe(nn.Module):
    """One transformers decoder layer, optionally with a control adapter.

        target "block":    y' = h + Δ + c·W'·dropout(Δ),   Δ = layer(h) − h
        target "writers":  the adapter on every residual writer's output inside the layer
    c = classes [B,T] (the class of the label each position predicts). No adapter: y = layer(h).
    `index` is the layer's index in the model (adapter keys use it); `window` its sliding window;
    `recompute` its activation checkpointing mode (None: none); `document_attention`: attention
    stays within each document of a packed row (`document_mask` from position_ids), else the
    causal / sliding-window mask of the row (`causal_mask`); `layer_type`: given for a rotary module
    that computes each layer type's own (Gemma 3's local and global bases).
    """

    def __init__(
        self,
        layer: nn.Module,
        index: int,
        rotary: nn.Module,
        window: int | None,
        attention: str,
        adapter: nn.Module | None = None,
        target: str = "block",
        writers: tuple[str, ...] = (),
        recompute: str | None = None,
        document_attention: bool = False,
        layer_type: str | None = None,
    ):
        super().__init__()
        self.layer, self.index, self.layer_type = layer, index, layer_type
        self.document_attention = document_attention
        self.recompute = recompute  # activation checkpointing mode (common/models/recompute.py)
        self.adapter = adapter
        self.target = target if adapter is not None else None
        self.window, self.attention = window, attention
        # Kept out of the module tree, so that casting the model (e.g. to bf16) leaves inv_freq in fp32.
        self.__dict__["rotary"] = rotary
        self._classes = _Classes()
        if self.target == "writers":
            for name in writers:
                parent, _, leaf = name.rpartition(".")
                owner = layer.get_submodule(parent) if parent else layer
                setattr(owner, leaf, WriterAdapter(getattr(owner, leaf), adapter, self._classes))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.recompute is None or not torch.is_grad_enabled():
            return self._forward(*inputs)
        from cap_common.models import recompute

        return recompute.run(self._forward, self.recompute, *inputs)

    def mask(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The attention mask of this call (see causal_mask, document_mask)."""
        if self.document_attention:
            return document_masks.get(position_ids, self.window, hidden.dtype)
        return causal_mask(hidden.shape[1], self.window, self.attention, hidden.dtype, hidden.device)

    def _forward(self, hidden, position_ids, classes, labels) -> tuple[torch.Tensor, ...]:
        if next(self.rotary.buffers()).device != hidden.device:
            self.rotary.to(hidden.device)
        per_type = () if self.layer_type is None else (self.layer_type,)
        kwargs = dict(
            position_embeddings=self.rotary(hidden, position_ids, *per_type),
            position_ids=position_ids,
            attention_mask=self.mask(hidden, position_ids),
        )
        if self.target == "writers":
            self._classes.value = classes
            try:
                out = self.layer(hidden, **kwargs)
            finally:
                self._classes.value = None
        else:
            out = self.layer(hidden, **kwargs)
            if self.target == "block":
                out = hidden + self.adapter(out - hidden, classes)
        return out, position_ids, classes, labels


LossFn = Callable[..., torch.Tensor]


class LmHeadPipe(nn.Module):
    """Final norm and LM head. Returns logits [B,T,V] (·logit_scale; cap·tanh(·/cap) if softcapped),
    or, with a loss_fn, what

        loss_fn(hidden [B,T,H], weight [V,H], labels [B,T], classes [B,T], logit_scale=s, softcap=cap)

    returns, where hidden is after the final norm and logits would be softcap(s·hidden·weightᵀ).
    """

    def __init__(
        self,
        norm: nn.Module,
        head: nn.Linear,
        logit_scale: float | None = None,
        softcap: float | None = None,
        loss_fn: LossFn | None = None,
    ):
        super().__init__()
        self.norm, self.head = norm, head
        self.logit_scale, self.softcap = logit_scale, softcap
        self.loss_fn = loss_fn

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (after the final norm) [B,T,H] → logits [B,T,V]."""
        logits = self.head(hidden)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        hidden, _, classes, labels = inputs
        hidden = self.norm(hidden)
        if self.loss_fn is None:
            return self.logits(hidden)
        return self.loss_fn(
            hidden,
            self.head.weight,
            labels,
            classes,
            logit_scale=1.0 if self.logit_scale is None else self.logit_scale,
            softcap=self.softcap,
        )
