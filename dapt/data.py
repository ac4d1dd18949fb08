"""Data: load and validate text, clean it, tokenise once, pack (MLM) or truncate (classification), and
cut it into per-rank batches.

Training order is a pure function of (seed, epoch, rank, world size), so a run can be resumed at any
batch. Evaluation shards are disjoint and cover every example exactly once.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from dapt.config import DataConfig
from dapt.errors import DaptError

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Drop IMDB's HTML line breaks and collapse whitespace."""
    return _SPACE.sub(" ", _BR.sub(" ", text)).strip()


def load_table(cfg: DataConfig, seed: int, label_column: str | None = None) -> Any:
    """A `datasets.Dataset` with a validated `text` column (and `label` when a label column is named).

    Formats, label names, validation and repairs: `dapt.sources`."""
    from dapt.sources import load_source, print_notes

    ds, report = load_source(cfg, seed, label_column)
    print_notes(report)
    return ds


def split_validation(ds: Any, fraction: float, seed: int) -> tuple[Any, Any | None]:
    """Split off a seeded held-out slice (at least one example) for periodic evaluation."""
    if fraction <= 0:
        return ds, None
    n_val = max(1, int(round(len(ds) * fraction)))
    if n_val >= len(ds):
        raise DaptError(f"validation_split {fraction} leaves no training data out of {len(ds)} examples")
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# --- MLM: tokenise and pack ----------------------------------------------------------------------

def _procs(num_proc: int | None) -> int | None:
    return num_proc if num_proc and num_proc > 1 else None  # datasets: None = in this process


def tokenize_for_mlm(ds: Any, tokenizer: Any, num_proc: int | None = None) -> Any:
    """[CLS] text [SEP] per example, no truncation: packing cuts the blocks."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer([clean_text(t) for t in batch["text"]], add_special_tokens=True,
                        truncation=False, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)
        return {"input_ids": enc["input_ids"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize", num_proc=_procs(num_proc))


def mlm_examples(ds: Any, tokenizer: Any, max_seq_length: int, packing: bool, num_proc: int | None = None) -> Any:
    """MLM training rows: packed full blocks, or (packing off) one review per row, cut to
    max_seq_length ([CLS] head [SEP]) and padded per batch."""
    tokens = tokenize_for_mlm(ds, tokenizer, num_proc)
    if packing:
        return pack_blocks(tokens, max_seq_length)
    sep = tokenizer.sep_token_id

    def cut(batch: dict[str, list]) -> dict[str, list]:
        return {"input_ids": [ids if len(ids) <= max_seq_length else ids[:max_seq_length - 1] + [sep]
                              for ids in batch["input_ids"]]}

    return tokens.map(cut, batched=True, desc="truncate")


def pack_blocks(ds: Any, block_size: int) -> Any:
    """Concatenate token streams and cut full blocks of `block_size`; the short remainder is dropped,
    so no position in an MLM batch is padding."""

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = [tok for ids in batch["input_ids"] for tok in ids]
        n = (len(stream) // block_size) * block_size
        return {"input_ids": [stream[i:i + block_size] for i in range(0, n, block_size)]}

    # Large map batches keep the per-batch remainder (dropped) negligible.
    return ds.map(group, batched=True, batch_size=2000, remove_columns=ds.column_names, desc="pack")


def mask_tokens(input_ids: torch.Tensor, special_ids: Sequence[int], mask_id: int, vocab_size: int,
                probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `probability` of the non-special positions; of those 80% -> [MASK],
    10% -> a random token, 10% unchanged. Returns (inputs, labels with -100 where not chosen)."""
    inputs = input_ids.clone()
    labels = input_ids.clone()
    special = torch.isin(inputs, torch.tensor(list(special_ids), dtype=inputs.dtype))
    probs = torch.full(inputs.shape, probability)
    probs[special] = 0.0
    chosen = torch.bernoulli(probs, generator=generator).bool()
    for row in range(inputs.shape[0]):  # every row keeps at least one target, so no loss is 0/0
        if not chosen[row].any():
            candidates = (~special[row]).nonzero().flatten()
            if len(candidates):
                pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
                chosen[row, pick] = True
    labels[~chosen] = -100
    to_mask = torch.bernoulli(torch.full(inputs.shape, 0.8), generator=generator).bool() & chosen
    inputs[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(inputs.shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    random_words = torch.randint(vocab_size, inputs.shape, generator=generator, dtype=inputs.dtype)
    inputs[to_random] = random_words[to_random]
    return inputs, labels


def batch_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, first index): independent of worker count and order."""
    return int(np.random.SeedSequence([p % (2**32) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass
class MLMCollator:
    special_ids: tuple[int, ...]
    mask_id: int
    vocab_size: int
    probability: float
    seed: int
    epoch: int  # -1 for evaluation: the same masks at every evaluation

    pad_id: int = 0

    def __call__(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        seqs = rows["input_ids"]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch + 1, rows["_index"][0]))
        inputs, labels = mask_tokens(ids, self.special_ids, self.mask_id, self.vocab_size, self.probability, gen)
        if all(len(x) == width for x in seqs):
            # Packed blocks: no padding, so no attention mask (SDPA may then use flash kernels).
            return {"input_ids": inputs, "labels": labels}
        mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in seqs])[:, None]).long()
        return {"input_ids": inputs, "attention_mask": mask, "labels": labels}


# --- classification: truncate and pad -------------------------------------------------------------

def truncate_ids(ids: list[int], budget: int, strategy: str, head_tokens: int) -> list[int]:
    """Cut token ids (without special tokens) to `budget`: the head, or head + tail (Sun et al. 2019)."""
    if len(ids) <= budget:
        return ids
    if strategy == "head":
        return ids[:budget]
    tail = budget - head_tokens
    return ids[:head_tokens] + ids[len(ids) - tail:]


def encode_for_classification(tokenizer: Any, texts: Sequence[str], max_seq_length: int, strategy: str,
                              head_tokens: int) -> tuple[list[list[int]], list[int]]:
    """[CLS] + truncated ids + [SEP] per cleaned text, and each text's token count before truncation
    (with the two special tokens). Training, evaluation and prediction all cut reviews here."""
    cls_id, sep_id = _cls_sep(tokenizer)
    budget = max_seq_length - 2  # [CLS] ... [SEP]
    enc = tokenizer([clean_text(t) for t in texts], add_special_tokens=False, truncation=False,
                    return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
    return [[cls_id, *truncate_ids(ids, budget, strategy, head_tokens), sep_id] for ids in enc], [len(ids) + 2 for ids in enc]


def _cls_sep(tokenizer: Any) -> tuple[int, int]:
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise DaptError("the tokenizer has no [CLS]/[SEP] tokens (a BERT-family tokenizer is needed)")
    return tokenizer.cls_token_id, tokenizer.sep_token_id


def tokenize_for_classification(ds: Any, tokenizer: Any, max_seq_length: int, strategy: str,
                                head_tokens: int, num_proc: int | None = None) -> Any:
    _cls_sep(tokenizer)  # a clear error before the map, not from inside a worker

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out, n_tokens = encode_for_classification(tokenizer, batch["text"], max_seq_length, strategy, head_tokens)
        return {"input_ids": out, "length": [len(x) for x in out],
                "truncated": [n > max_seq_length for n in n_tokens],
                "n_tokens": n_tokens}  # before truncation (data summaries)

    return ds.map(encode, batched=True, remove_columns=["text"], desc="tokenize", num_proc=_procs(num_proc))


@dataclass
class PadCollator:
    """Pads a batch to its own longest member, not to max_seq_length."""

    pad_id: int

    def __call__(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        seqs = rows["input_ids"]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "label" in rows:
            batch["labels"] = torch.tensor(rows["label"], dtype=torch.long)
        return batch


# --- batching -------------------------------------------------------------------------------------

class IndexedRows(torch.utils.data.Dataset):
    """Lets a DataLoader fetch a whole micro-batch of a `datasets.Dataset` in one call."""

    def __init__(self, ds: Any, columns: Sequence[str]):
        self.ds = ds.select_columns(list(columns))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        rows = self.ds[indices]
        rows["_index"] = list(indices)
        return rows

    def __getitem__(self, index: int) -> dict[str, Any]:  # pragma: no cover - DataLoader uses __getitems__
        return self.__getitems__([index])


def steps_per_epoch(n_examples: int, effective_batch_size: int) -> int:
    steps = n_examples // effective_batch_size
    if steps == 0:
        raise DaptError(f"{n_examples} training examples are fewer than one effective batch "
                        f"({effective_batch_size}); lower effective_batch_size or add data")
    return steps


def train_batches(n_examples: int, epoch: int, seed: int, rank: int, world_size: int, micro: int,
                  effective: int, lengths: Sequence[int] | None = None,
                  bucket_steps: int = 50) -> list[list[int]]:
    """This rank's micro-batches (index lists) for one epoch.

    A seeded permutation per epoch; each global round of `world_size` micro-batches is dealt out
    rank by rank. The epoch uses steps * effective examples (< one effective batch is left out, a
    different random few each epoch), so every rank runs the same number of micro-batches.
    Optimizer step s always covers the same examples, whatever the world size (resume on another
    world size maps exactly).

    With `lengths` (length bucketing): chunks of `bucket_steps` effective batches are sorted by
    length, cut into steps, and the steps of a chunk shuffled; micro-batches then hold reviews of
    similar length (little padding) while the batch order stays random. Within a step, micro-step i
    takes the i-th sorted slice of world_size * micro examples and deals it round-robin to the ranks,
    so every rank gets the same length range: a rank with the longest reviews would make the others
    wait at each gradient all-reduce.
    """
    steps = steps_per_epoch(n_examples, effective)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(batch_seed(seed, epoch)))
    perm = perm[: steps * effective]
    if lengths is not None:
        gen = torch.Generator().manual_seed(batch_seed(seed, epoch, 1))
        order: list[int] = []
        for start in range(0, steps, bucket_steps):
            chunk = sorted(perm[start * effective:min(steps, start + bucket_steps) * effective].tolist(),
                           key=lambda i: lengths[i])
            groups = [chunk[k:k + effective] for k in range(0, len(chunk), effective)]
            for g in torch.randperm(len(groups), generator=gen).tolist():
                order.extend(groups[g])
        # [micro-step, example in the sorted slice] -> [micro-step, rank, example]
        dealt = torch.tensor(order, dtype=torch.long).view(-1, micro, world_size).transpose(1, 2)
        return dealt[:, rank, :].tolist()
    used = perm.view(-1, world_size, micro)
    return used[:, rank, :].tolist()


def eval_shard(n_examples: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s share of 0..n-1: strided, disjoint, together exactly all indices."""
    return list(range(rank, n_examples, world_size))


def eval_batches(indices: list[int], batch_size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Fixed-size batches of a shard, longest first when lengths are known (less padding)."""
    if lengths is not None:
        indices = sorted(indices, key=lambda i: -lengths[i])
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def num_eval_batches(n_examples: int, world_size: int, batch_size: int) -> int:
    """The most batches any rank gets: all ranks must run that many forward passes (ZeRO-3
    gathers weights collectively), ranks with fewer real batches run padding batches."""
    return math.ceil(math.ceil(n_examples / world_size) / batch_size)


def make_loader(rows: IndexedRows, batches: list[list[int]], collate: Any, num_workers: int,
                pin_memory: bool, generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    return iter(torch.utils.data.DataLoader(rows, batch_sampler=batches, collate_fn=collate,
                                            num_workers=num_workers, pin_memory=pin_memory, generator=generator))
