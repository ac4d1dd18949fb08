"""Model surgery for speed: the same results from less compute, with the state dict unchanged.

* `use_sparse_head`: the MLM vocabulary projection only at masked positions (~15% of tokens).
* `cls_only_last_layer`: a classifier's last encoder layer for [CLS] only (the pooler reads nothing else).

Both patch `forward` on the instance; exported models are plain Hugging Face models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class SparseMLMOutput:
    loss: torch.Tensor  # mean over this batch's masked tokens
    loss_sum: torch.Tensor  # sum over them (for a loss normalised by the global count)
    logits: torch.Tensor  # [masked tokens, vocabulary]


def use_sparse_head(model: torch.nn.Module) -> torch.nn.Module:
    """Training forward that runs the vocabulary projection only at masked positions (~15% of
    tokens): the 30,522-word decoder is the most expensive layer of a small BERT. Without labels
    (export checks, inference) the model's own dense forward runs. State-dict keys are unchanged."""
    dense_forward = model.forward
    if not (hasattr(model, "cls") and hasattr(model, "bert")):
        return model  # not a BERT-layout MLM: keep the dense head

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, masked_positions: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        if labels is None:
            return dense_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # Packed batches come without a mask (no padding): SDPA can pick its fastest (flash) kernel.
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        if masked_positions is None:  # found here: boolean indexing (a host sync on accelerators)
            masked_positions = (labels.flatten() != -100).nonzero().flatten()
        # the same rows, in the same order, as hidden[labels != -100]
        logits = model.cls(hidden.flatten(0, 1).index_select(0, masked_positions))
        targets = labels.flatten().index_select(0, masked_positions)
        loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        return SparseMLMOutput(loss=loss_sum / max(masked_positions.numel(), 1), loss_sum=loss_sum, logits=logits)

    model.forward = forward
    return model


def cls_only_last_layer(model: Any) -> Any:
    """Run a BERT classifier's last encoder layer for the [CLS] position only.

    The pooler reads only [CLS], so the last layer's outputs at the other positions are computed and
    thrown away: its query, attention, output projection and feed-forward need one position, only its
    keys and values need all (about 5/6 of the layer saved; 1/L of the encoder). Logits and gradients
    are the dense model's up to float rounding; the state dict is unchanged, so exported models are
    plain Hugging Face models. Models of another layout are returned as they are.
    """
    layers = getattr(getattr(getattr(model, "bert", None), "encoder", None), "layer", None)
    last = layers[-1] if layers is not None and len(layers) else None
    sa = getattr(getattr(last, "attention", None), "self", None)
    if not (hasattr(model, "classifier") and all(hasattr(sa, k) for k in ("query", "key", "value", "dropout"))):
        return model

    def forward(hidden_states: Any, attention_mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        cls = hidden_states[:, :1]
        batch, length, _ = hidden_states.shape

        def heads(x: Any, n: int) -> Any:  # [batch, n, hidden] -> [batch, heads, n, head size]
            return x.view(batch, n, -1, sa.attention_head_size).transpose(1, 2)

        # BERT passes a 4-D mask ([batch, 1, queries, keys], boolean or additive) or None (no padding).
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :1, :]
        context = F.scaled_dot_product_attention(
            heads(sa.query(cls), 1), heads(sa.key(hidden_states), length), heads(sa.value(hidden_states), length),
            attn_mask=attention_mask, dropout_p=sa.dropout.p if sa.training else 0.0, scale=sa.scaling)
        attended = last.attention.output(context.transpose(1, 2).reshape(batch, 1, -1), cls)
        return last.output(last.intermediate(attended), attended)  # [batch, 1, hidden]: the pooler takes [:, 0]

    last.forward = forward
    return model
