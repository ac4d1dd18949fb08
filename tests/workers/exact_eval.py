"""Run under torchrun with any number of ranks: score a classifier on data sets of many sizes with
dapt's sharded evaluation; rank 0 writes what the all-reduced totals say, for the test to compare
with a single-process computation."""
import json
import sys

import datasets
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dapt.data.classify import tokenize_for_classification
from dapt.distributed import node_main_first, setup_distributed, shutdown
from dapt.eval.scoring import score_classifier, score_with_predictions

model_dir, data_file, out_file = sys.argv[1:4]
sizes = [int(x) for x in sys.argv[4].split(",")]
info = setup_distributed()
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
full = datasets.load_dataset("json", data_files=data_file, split="train")
results = {}
for n in sizes:
    with node_main_first(info, "shared"):  # rank 0 writes the datasets cache, the others reuse it
        data = tokenize_for_classification(full.select(range(n)), tok, 64, "head+tail", 16)
    for bs in (1, 4, 16):
        res = score_classifier(lambda b: model(**b).logits, data, info, bs, tok.pad_token_id, info.device)
        results[f"{n}/{bs}"] = res
        with_preds, preds = score_with_predictions(lambda b: model(**b).logits, data, info, bs, tok.pad_token_id,
                                                   info.device)
        assert with_preds == res  # the same counts either way
        assert (preds is None) == (not info.is_main)
        if preds is not None:
            results[f"{n}/{bs}"] = {**res, "predictions": preds}
if info.is_main:
    with open(out_file, "w") as f:
        json.dump({"world_size": info.world_size, "results": results}, f)
shutdown()
