"""Stage 1: continued masked-language-model pretraining on in-domain text, packed into full blocks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dapt.config import MLMConfig, parse_config
from dapt.data import IndexedRows, MLMCollator, load_table, mlm_examples, split_validation
from dapt.distributed import DistInfo, all_reduce_sum, main_process_first
from dapt.errors import DaptError, cli_entry
from dapt.evaluation import sharded_batches, to_device
from dapt.manifest import load_prepared, stage_settings
from dapt.models import load_mlm_model
from dapt.training import run_stage


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
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if labels is None:
            return dense_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # Packed batches come without a mask (no padding): SDPA can pick its fastest (flash) kernel.
        hidden = model.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        chosen = labels != -100
        logits = model.cls(hidden[chosen])
        loss_sum = torch.nn.functional.cross_entropy(logits.float(), labels[chosen], reduction="sum")
        return SparseMLMOutput(loss=loss_sum / chosen.sum().clamp(min=1), loss_sum=loss_sum, logits=logits)

    model.forward = forward
    return model


@dataclass
class MLMTask:
    cfg: MLMConfig
    tokenizer: Any
    train_blocks: Any
    val_blocks: Any | None
    arch: str = "mlm"

    def __post_init__(self) -> None:
        self.train_rows = IndexedRows(self.train_blocks, ["input_ids"])
        self.n_train = len(self.train_blocks)
        self.lengths = None  # packed blocks are all full: nothing to bucket
        self.global_loss_norm = self.cfg.global_loss_norm

    @staticmethod
    def n_targets(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != -100).sum())  # on the host, before the batch moves

    def collate(self, epoch: int) -> MLMCollator:
        tok = self.tokenizer
        return MLMCollator(special_ids=tuple(tok.all_special_ids), mask_id=tok.mask_token_id,
                           vocab_size=len(tok), probability=self.cfg.mlm_probability, seed=self.cfg.seed,
                           epoch=epoch, pad_id=tok.pad_token_id)

    @torch.no_grad()
    def evaluate(self, engine: Any, info: DistInfo) -> dict[str, float]:
        """Held-out loss over every masked token of the validation blocks (fixed masks), and perplexity."""
        if self.val_blocks is None:
            return {}
        collate = self.collate(epoch=-1)
        sums = torch.zeros(2, dtype=torch.float64)  # loss * targets, targets
        for indices, real in sharded_batches(len(self.val_blocks), info, self.cfg.eval_batch_size):
            batch = collate({"input_ids": self.val_blocks[indices]["input_ids"], "_index": indices})
            loss = engine(**to_device(batch, info.device)).loss.double().cpu()
            if real:
                n = int((batch["labels"] != -100).sum())
                sums += torch.tensor([float(loss) * n, n], dtype=torch.float64)
        total = all_reduce_sum(sums, info)
        mean = float(total[0] / total[1])
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "masked_tokens": int(total[1])}

    def probe(self) -> dict[str, torch.Tensor]:
        source = self.val_blocks if self.val_blocks is not None else self.train_blocks
        return self.collate(epoch=-1)({"input_ids": source.select(range(1))["input_ids"], "_index": [0]})

    def export_settings(self) -> dict[str, Any]:
        return {"stage": "mlm", "max_seq_length": self.cfg.max_seq_length,
                "mlm_probability": self.cfg.mlm_probability}


def build_task(cfg: MLMConfig, info: DistInfo, tokenizer: Any) -> MLMTask:
    if cfg.prepared_dir:  # blocks made by launch/prepare.py with the same settings (checked)
        data = load_prepared(cfg.prepared_dir, stage_settings(cfg, "mlm", tokenizer))
        train_blocks, val_blocks = data["train"], data.get("validation")
        return MLMTask(cfg, tokenizer, train_blocks, val_blocks)
    with main_process_first(info):  # rank 0 loads and tokenises; the others hit its datasets cache
        table = load_table(cfg, cfg.seed)
        train_text, val_text = split_validation(table, cfg.validation_split, cfg.seed)
        train_blocks = mlm_examples(train_text, tokenizer, cfg.max_seq_length, cfg.packing, cfg.num_proc)
        val_blocks = (mlm_examples(val_text, tokenizer, cfg.max_seq_length, cfg.packing, cfg.num_proc)
                      if val_text else None)
    if len(train_blocks) == 0:
        raise DaptError(f"the training text does not fill one block of {cfg.max_seq_length} tokens")
    if val_blocks is not None and len(val_blocks) == 0:
        val_blocks = None  # held-out text shorter than one block: no held-out loss
    return MLMTask(cfg, tokenizer, train_blocks, val_blocks)


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse_config(MLMConfig, "mlm", argv)

    def load(path: str) -> torch.nn.Module:
        model = load_mlm_model(path, cfg.attn_implementation)
        return use_sparse_head(model) if cfg.sparse_mlm_head else model

    return run_stage(cfg, build_task, load)
