"""Export: a sharded DeepSpeed checkpoint -> a Hugging Face model folder (safetensors, config, tokenizer).

The fp32 master weights are consolidated from the ZeRO shards. zero_to_fp32 may omit tied parameters
(DeepSpeed#1896): BertForMaskedLM's decoder is the word-embedding matrix. The exported model is
re-tied, every tensor is compared with the consolidated weights, and tied tensors must share storage.
The folder is written beside the target and renamed into place, so a good export is never left
half-overwritten.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from dapt.errors import DaptError
from dapt.io import dump_json, read_json
from dapt.model.card import collect, write_card
from dapt.model.loading import quiet_transformers

META_DIR = "hf_meta"  # config + tokenizer + dapt.json saved inside every checkpoint tag
ARCHES = ("mlm", "classifier")


def save_hf_meta(tag_dir: Path, model_config: Any, tokenizer: Any, arch: str, dapt: dict[str, Any]) -> None:
    """What export needs besides the weights, so any checkpoint can be exported on its own."""
    meta = tag_dir / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(meta)
    tokenizer.save_pretrained(meta)
    dump_json({"arch": arch, "dapt": dapt}, meta / "dapt.json")


def locate_checkpoint(path: str) -> Path:
    """A checkpoint tag folder, a `checkpoints/` folder (its `latest`), or a run's output dir."""
    p = Path(path).expanduser()
    for root in (p, p / "checkpoints"):
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (root / tag).is_dir():
                raise DaptError(f"{latest} names checkpoint '{tag}', which does not exist")
            return root / tag
    if (p / META_DIR).is_dir():
        return p
    if not p.exists():
        raise DaptError(f"checkpoint not found: {path}")
    raise DaptError(f"{path} is not a dapt checkpoint (no 'latest' file and no {META_DIR}/ folder)")


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    return [names for names in by_storage.values() if len(names) > 1]


def build_model(arch: str, config: Any) -> torch.nn.Module:
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    if arch not in ARCHES:
        raise DaptError(f"unknown model kind '{arch}' in checkpoint metadata")
    cls = AutoModelForMaskedLM if arch == "mlm" else AutoModelForSequenceClassification
    return cls.from_config(config)


def consolidate(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, EOFError) as exc:
        raise DaptError(f"cannot read checkpoint {tag_dir}: {type(exc).__name__}: {exc}") from None


def load_exportable(tag_dir: Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The checkpoint's fp32 weights in a fresh model, tied and verified; its tokenizer and metadata."""
    from transformers import AutoConfig, AutoTokenizer

    meta_dir = tag_dir / META_DIR
    if not (meta_dir / "dapt.json").is_file():
        raise DaptError(f"{tag_dir} has no {META_DIR}/dapt.json (not written by dapt?)")
    meta = read_json(meta_dir / "dapt.json")
    config = AutoConfig.from_pretrained(meta_dir)
    config.dapt = meta.get("dapt", {})
    tokenizer = AutoTokenizer.from_pretrained(meta_dir)
    state = consolidate(tag_dir)

    model = build_model(meta["arch"], config)
    model.tie_weights()
    groups = _tied_groups(model)
    tied_alias = {name: g for g in groups for name in g}
    expected = set(model.state_dict())
    buffers = {n for n, _ in model.named_buffers()}
    unexpected = sorted(set(state) - expected - buffers)
    if unexpected:
        raise DaptError(f"checkpoint {tag_dir} holds '{unexpected[0]}', which the model does not have")
    missing = [k for k in expected - set(state) if k not in buffers
               and not any(alias in state for alias in tied_alias.get(k, ()))]
    if missing:
        raise DaptError(f"checkpoint {tag_dir} lacks '{sorted(missing)[0]}'")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    model.tie_weights()  # the decoder shares the (loaded) word embeddings again
    _verify(model, state, tag_dir)
    return model.eval(), tokenizer, meta


def _verify(model: torch.nn.Module, state: dict[str, torch.Tensor], tag_dir: Path) -> None:
    params = model.state_dict()
    for name, tensor in state.items():
        if name in params and not torch.equal(params[name].float(), tensor.float()):
            raise RuntimeError(f"export of {tag_dir}: '{name}' differs from the checkpoint after loading")
    for group in _tied_groups(model):
        ref = params[group[0]]
        for name in group[1:]:
            if params[name].data_ptr() != ref.data_ptr():
                raise RuntimeError(f"export of {tag_dir}: '{name}' is not tied to '{group[0]}'")


def write_model_folder(model: torch.nn.Module, tokenizer: Any, out_dir: Path, overwrite: bool) -> Path:
    """Save to a sibling temp folder, then swap it in: the old export survives any failure."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and not overwrite:
        raise DaptError(f"{out_dir} already exists; pass --overwrite_output_dir to replace it")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def export_checkpoint(checkpoint: str, out_dir: Path, overwrite: bool) -> tuple[Path, torch.nn.Module]:
    tag_dir = locate_checkpoint(checkpoint)
    model, tokenizer, meta = load_exportable(tag_dir)
    out = write_model_folder(model, tokenizer, out_dir, overwrite)
    try:  # the model card (README.md): recipe, data, engine, held-out metrics, from the run's own files
        write_card(out, collect(tag_dir, meta, model))
    except Exception as exc:  # noqa: BLE001 - a card problem must not lose a finished export
        print(f"warning: model card not written ({type(exc).__name__}: {exc})", flush=True)
    return out, model


@torch.no_grad()
def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float().cpu()
