"""A frozen-encoder linear probe: a low-noise statistic for "did adaptation change the encoder?".

A fine-tune's accuracy moves by about a point from seed to seed (dropout, order), so a handful of
fine-tune seeds cannot see a 1-point effect. A linear probe has no such noise: each model's encoder is
run once (no dropout) over a labelled pool and a large test set, features are the mean of the last
layer over real tokens (the same head+tail cut as the fine-tunes), and a logistic regression is
fitted on many balanced label draws from the pool (regularisation chosen by 5-fold CV inside each draw,
on standardised features). Both models see the same draws and the same test reviews, so their
difference is paired twice; dapt.eval.stats.draws_difference bootstraps draws and reviews together.

Used by benchmarks/dapt_gain.py; features are cached per model and data (`features`), so a later
invocation with more draws or another arm re-uses them.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np

FEATURES_VERSION = 1  # bump when the pooling or tokenisation below changes (invalidates caches)


def model_digest(model_dir: Path) -> str:
    """What the features depend on from the model: its weights and config files' bytes."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".txt") and f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def encode_features(model_dir: Path, texts: list[str], max_seq_length: int, head_tokens: int,
                    batch_size: int = 64) -> np.ndarray:
    """Mean-pooled last-layer features (float32, one row per text, in order) of a frozen encoder.

    The MLM head of an adapted checkpoint is not used (AutoModel loads the encoder only). Texts are
    run longest-first in batches of similar length, so padding costs little."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from dapt.data.text import encode_for_classification
    from dapt.model.loading import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    ids, _ = encode_for_classification(tok, texts, max_seq_length, "head+tail", head_tokens)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # an MLM checkpoint's head is expected to be left out: no table of it
    try:
        model = AutoModel.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = np.empty((len(ids), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = len(ids[rows[0]])
            x = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                x[j, :len(ids[i])] = torch.tensor(ids[i])
                mask[j, :len(ids[i])] = 1
            hidden = model(input_ids=x, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            out[rows] = pooled.float().numpy()
    return out


def features(model_dir: Path, texts: list[str], cache: Path, max_seq_length: int, head_tokens: int) -> np.ndarray:
    """encode_features, cached in `cache` (.npy + a key of model bytes, texts and settings)."""
    key = {"version": FEATURES_VERSION, "model": model_digest(model_dir), "max_seq_length": max_seq_length,
           "head_tokens": head_tokens, "texts": hashlib.sha256("\0".join(texts).encode()).hexdigest()}
    npy, meta = cache.with_suffix(".npy"), cache.with_suffix(".json")
    if npy.exists() and meta.exists() and json.loads(meta.read_text()).get("key") == key:
        return np.load(npy)
    t0 = time.perf_counter()
    feats = encode_features(model_dir, texts, max_seq_length, head_tokens)
    seconds = time.perf_counter() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, feats)
    meta.write_text(json.dumps({"key": key, "seconds": round(seconds, 1), "texts_per_s": round(len(texts) / seconds, 1)}))
    print(f"features: {len(texts)} texts in {seconds:.0f}s with {model_dir}", flush=True)
    return feats


def balanced_draws(labels: np.ndarray, size: int, n_draws: int, seed: int) -> list[np.ndarray]:
    """n_draws index sets into the pool, each with size // 2 of each label (binary), from one seed."""
    classes = np.unique(labels)
    if classes.size != 2 or size % 2:
        raise ValueError(f"balanced draws need two classes and an even size, got {classes.tolist()} and {size}")
    by_class = [np.flatnonzero(labels == c) for c in classes]
    if min(len(ix) for ix in by_class) < size // 2:
        raise ValueError(f"the probe pool has {min(len(ix) for ix in by_class)} reviews of a class, fewer than "
                         f"the {size // 2} a draw of {size} takes")
    rng = np.random.default_rng(seed)
    return [np.concatenate([rng.choice(ix, size // 2, replace=False) for ix in by_class]) for _ in range(n_draws)]


def probe_correct(pool: np.ndarray, pool_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                  draws: list[np.ndarray]) -> np.ndarray:
    """(draws, test) booleans: is draw d's logistic regression right on test review i."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    right = np.empty((len(draws), len(test_labels)), dtype=bool)
    with warnings.catch_warnings():  # scikit-learn 1.8+ announces default changes once per fit: not ours
        warnings.simplefilter("ignore", FutureWarning)
        for d, ix in enumerate(draws):
            clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], cv=5, max_iter=2000))
            clf.fit(pool[ix], pool_labels[ix])
            right[d] = clf.predict(test) == test_labels
    return right
