"""MLM data: tokenise without truncation, pack into full blocks, and mask (BERT's 80/10/10, seeded per batch;
per WordPiece token, or per whole word with `whole_word_mask`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from dapt.config import MLMConfig
from dapt.data.batching import batch_seed
from dapt.data.prepared import load_prepared, stage_settings
from dapt.data.sources import load_table, split_validation
from dapt.data.text import clean_text, map_procs, tokenize_fingerprint
from dapt.distributed import DistInfo, node_main_first
from dapt.errors import DaptError


def tokenize_for_mlm(ds: Any, tokenizer: Any, num_proc: int | None = None) -> Any:
    """[CLS] text [SEP] per example, no truncation: packing cuts the blocks."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer([clean_text(t) for t in batch["text"]], add_special_tokens=True,
                        truncation=False, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)
        return {"input_ids": enc["input_ids"]}

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize", num_proc=map_procs(num_proc),
                  new_fingerprint=tokenize_fingerprint(ds, tokenizer, __name__, stage="mlm"))


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
    special = torch.isin(input_ids, torch.tensor(list(special_ids), dtype=input_ids.dtype))
    probs = torch.full(input_ids.shape, probability)
    probs[special] = 0.0
    chosen = torch.bernoulli(probs, generator=generator).bool()
    for row in range(input_ids.shape[0]):  # every row keeps at least one target, so no loss is 0/0
        if not chosen[row].any():
            candidates = (~special[row]).nonzero().flatten()
            if len(candidates):
                pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
                chosen[row, pick] = True
    return replace_chosen(input_ids, chosen, mask_id, vocab_size, generator)


def word_continuations(tokenizer: Any) -> torch.Tensor:
    """continuation[id]: True for WordPiece's `##` pieces (a word = a token plus the `##` pieces after
    it). Built once from the vocabulary for whole-word masking; a vocabulary without them (BPE,
    SentencePiece) cannot say where words start, so it is refused."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    continuation = torch.tensor([isinstance(p, str) and p.startswith("##") for p in pieces], dtype=torch.bool)
    if not continuation.any():
        raise DaptError(f"whole_word_mask needs a WordPiece vocabulary ('##' continuation pieces); "
                        f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none")
    return continuation


def mask_words(input_ids: torch.Tensor, special_ids: Sequence[int], continuation: torch.Tensor, mask_id: int,
               vocab_size: int, probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-word masking: choose `probability` of the words (not of the pieces), then every piece of a
    chosen word is a target. The 80/10/10 replacement is then decided per piece, as BERT's own
    whole-word masking does (create_pretraining_data.py), so a chosen word may be partly [MASK] and
    partly kept or random, but its pieces are always all targets. A `##` piece with no word start
    before it in the row (the block began mid-word, or after a special token) starts a word of its own.
    Same generator discipline as mask_tokens: one draw of the input's shape, then the replacements."""
    special = torch.isin(input_ids, torch.tensor(list(special_ids), dtype=input_ids.dtype))
    cont = continuation.to(input_ids.device)[input_ids.clamp(0, len(continuation) - 1)] & ~special
    after_special = torch.ones_like(special)
    after_special[:, 1:] = special[:, :-1]
    start = ~special & (~cont | after_special)  # the first piece of each word
    word = start.long().cumsum(dim=1)  # word number (1, 2, ...) of each piece in its row; 0: before any word
    probs = torch.full(input_ids.shape, probability)
    probs[~start] = 0.0
    chosen_start = torch.bernoulli(probs, generator=generator).bool()  # one draw per word, at its first piece
    for row in range(input_ids.shape[0]):  # every row keeps at least one target, so no loss is 0/0
        if not chosen_start[row].any():
            candidates = start[row].nonzero().flatten()
            if len(candidates):
                pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
                chosen_start[row, pick] = True
    # spread each word's choice to all its pieces: chosen_word[row, w] for word number w
    chosen_word = torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1, dtype=torch.bool)
    chosen_word.scatter_(1, word * chosen_start, chosen_start)  # unchosen starts write False into slot 0
    chosen_word[:, 0] = False
    chosen = chosen_word.gather(1, word) & ~special
    return replace_chosen(input_ids, chosen, mask_id, vocab_size, generator)


def replace_chosen(input_ids: torch.Tensor, chosen: torch.Tensor, mask_id: int, vocab_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's 80/10/10 on the chosen positions, each decided per position. Returns (inputs, labels
    with -100 where not chosen)."""
    inputs = input_ids.clone()
    labels = input_ids.clone()
    labels[~chosen] = -100
    to_mask = torch.bernoulli(torch.full(inputs.shape, 0.8), generator=generator).bool() & chosen
    inputs[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(inputs.shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    random_words = torch.randint(vocab_size, inputs.shape, generator=generator, dtype=inputs.dtype)
    inputs[to_random] = random_words[to_random]
    return inputs, labels


@dataclass
class MLMCollator:
    special_ids: tuple[int, ...]
    mask_id: int
    vocab_size: int
    probability: float
    seed: int
    epoch: int  # -1 for evaluation: the same masks at every evaluation

    pad_id: int = 0
    # Whole-word masking: continuation[id] from word_continuations(tokenizer); None = per-piece masking.
    continuation: torch.Tensor | None = None
    # Also return the flat indices of the targets ("masked_positions"), found here on the host: the
    # sparse MLM head then gathers them without a device-to-host sync (boolean indexing on a GPU waits
    # for the device to learn the result's size).
    positions: bool = False

    def __call__(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        seqs = rows["input_ids"]
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch + 1, rows["_index"][0]))
        if self.continuation is None:
            inputs, labels = mask_tokens(ids, self.special_ids, self.mask_id, self.vocab_size, self.probability, gen)
        else:
            inputs, labels = mask_words(ids, self.special_ids, self.continuation, self.mask_id, self.vocab_size,
                                        self.probability, gen)
        out = {"input_ids": inputs, "labels": labels}
        if self.positions:
            out["masked_positions"] = (labels.flatten() != -100).nonzero().flatten()
        if all(len(x) == width for x in seqs):
            return out  # packed blocks: no padding, so no attention mask (SDPA may then use flash kernels)
        out["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in seqs])[:, None]).long()
        return out


def mlm_splits(cfg: MLMConfig, info: DistInfo, tokenizer: Any) -> tuple[Any, Any | None]:
    """The MLM stage's training blocks and held-out blocks (None without a held-out slice): from a
    prepared directory (settings checked), or read, split, tokenised and packed here (the first rank of
    each datasets cache first, the other ranks reuse it: see node_main_first and DAPT_CACHE_SCOPE)."""
    if cfg.prepared_dir:
        data = load_prepared(cfg.prepared_dir, stage_settings(cfg, "mlm", tokenizer))
        train, val = data["train"], data.get("validation")
    else:
        with node_main_first(info):
            table = load_table(cfg, cfg.seed)
            train_text, val_text = split_validation(table, cfg.validation_split, cfg.seed)
            train = mlm_examples(train_text, tokenizer, cfg.max_seq_length, cfg.packing, cfg.num_proc)
            val = (mlm_examples(val_text, tokenizer, cfg.max_seq_length, cfg.packing, cfg.num_proc)
                   if val_text else None)
    if len(train) == 0:
        raise DaptError(f"the training text does not fill one block of {cfg.max_seq_length} tokens")
    if val is not None and len(val) == 0:
        val = None  # held-out text shorter than one block: no held-out loss
    return train, val
