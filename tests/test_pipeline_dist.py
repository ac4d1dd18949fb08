"""Both stages for real on 2 CPU ranks (gloo) with a tiny BERT: ZeRO-2 and ZeRO-3, fp32 and bf16, as forked
ranks (tests/ranks.py: a launcher's environment, the imports shared), then exact evaluation and export round
trips. The launchers themselves run where they are what is tested: `deepspeed` passing `--local_rank` to
launch/mlm.py (test_resume's stop tests) and to the installed `dapt` (test_packaging), `torchrun -m dapt`
(test_packaging), and a failing pipeline stage under the real `deepspeed` launcher (the last test here)."""
import json
import os

import pytest
import torch
from conftest import assert_ok, run_cli

pytestmark = pytest.mark.dist

COMMON = ["--effective_batch_size", "16", "--micro_batch_size", "4", "--logging_steps", "2", "--seed", "1"]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _mlm(out, tiny_model, demo_files, env, ds, launcher, epochs=2):
    args = ["--model_name_or_path", tiny_model, "--data_files", demo_files["unlabelled"], "--output_dir", out,
            "--ds_config", ds, "--max_seq_length", "64", "--num_epochs", epochs, "--learning_rate", "1e-3",
            "--warmup", "0.1", "--validation_split", "0.1", *COMMON]
    return run_cli("mlm.py", args, env, ranks=2, launcher=launcher)


@pytest.fixture(scope="module")
def mlm_zero2(tmp_path_factory, tiny_model, demo_files, base_env):
    out = tmp_path_factory.mktemp("mlm_zero2") / "run"
    proc = _mlm(out, tiny_model, demo_files, base_env, "ds_configs/zero2_auto.json", "fork")
    assert_ok(proc)
    return out, proc


def test_mlm_zero2_two_ranks(mlm_zero2):
    out, proc = mlm_zero2
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["world_size"] == 2 and run_cfg["precision"] == "fp32"
    ds = run_cfg["deepspeed"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["zero_optimization"]["stage"] == 2
    summary = json.loads((out / "summary.json").read_text())
    log = _jsonl(out / "metrics.jsonl")
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert summary["steps"] == train[-1]["step"] and summary["steps"] >= 10
    assert [r["step"] for r in train] == sorted({*range(2, summary["steps"] + 1, 2), summary["steps"]})
    assert len(evals) == 2 and all(r["eval_masked_tokens"] > 0 for r in evals)  # one per epoch
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 10.5  # it learns (random init: ln 30522 = 10.3)
    assert all(r["tokens_per_s"] > 0 for r in train)
    # linear warmup (10%) then linear decay towards 0
    lrs = [r["lr"] for r in train]
    peak = lrs.index(max(lrs))
    assert lrs[peak] <= 1e-3 and lrs[-1] < lrs[peak] and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    # per-rank ZeRO shards, and the export check on the fp32 run is exact
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert {p.name for p in ckpt.glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert summary["export_max_abs_logit_diff"] <= 1e-5
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()


def test_mlm_export_keeps_the_decoder_tied(mlm_zero2, tiny_model):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForMaskedLM

    out, _ = mlm_zero2
    exported = AutoModelForMaskedLM.from_pretrained(out / "model").eval()
    emb = exported.bert.embeddings.word_embeddings.weight
    assert exported.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()
    initial = AutoModelForMaskedLM.from_pretrained(tiny_model)
    assert not torch.equal(emb, initial.bert.embeddings.word_embeddings.weight)  # trained weights were exported
    # Independently consolidate the shards and compare logits with the exported folder.
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    assert torch.equal(state["bert.embeddings.word_embeddings.weight"], emb)
    fresh = AutoModelForMaskedLM.from_config(exported.config)
    fresh.load_state_dict(state, strict=False)
    fresh.tie_weights()
    fresh.eval()
    ids = torch.tensor([[101, 2023, 3185, 2001, 103, 999, 102]])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, exported(input_ids=ids).logits)


def test_mlm_zero3_bf16(tmp_path, tiny_model, demo_files, base_env):
    out = tmp_path / "run"
    assert_ok(_mlm(out, tiny_model, demo_files, base_env, "ds_configs/zero3_bf16.json", "fork", epochs=1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["world_size"] == 2
    run_cfg = json.loads((out / "run_config.json").read_text())
    assert run_cfg["deepspeed"]["zero_optimization"]["stage"] == 3 and run_cfg["deepspeed"]["bf16"]["enabled"]
    # bf16 forward vs fp32 export: close, not equal; an untied or empty export would be far off
    assert summary["export_max_abs_logit_diff"] < 0.5
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(out / "model")
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert model.bert.embeddings.word_embeddings.weight.abs().sum() > 0  # ZeRO-3 did not export empty weights


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, mlm_zero2, demo_files, base_env):
    """Stage 2 from the Stage-1 output dir, ZeRO-3 fp32 (forked ranks); 19 validation examples (prime);
    best-checkpoint selection on held-out accuracy with early stopping, keeping one checkpoint."""
    out = tmp_path_factory.mktemp("ft_zero3") / "run"
    args = ["--model_name_or_path", mlm_zero2[0], "--data_files", demo_files["train"], "--output_dir", out,
            "--ds_config", "ds_configs/zero3_auto.json", "--max_seq_length", "64", "--head_tokens", "16",
            "--num_epochs", "2", "--learning_rate", "2e-3", "--warmup", "0.1", "--validation_split", "0.1",
            "--select_best", "accuracy", "--early_stopping_patience", "3", "--eval_steps", "3", "--keep_last", "1",
            *COMMON]
    assert_ok(run_cli("finetune.py", args, base_env, ranks=2, launcher="fork"))
    return out


def test_finetune_zero3_from_mlm_output(finetuned):
    summary = json.loads((finetuned / "summary.json").read_text())
    # the export is the selected checkpoint's; the engine was given its weights back for the check
    assert summary["export_max_abs_logit_diff"] <= 1e-5 and summary["world_size"] == 2
    evals = [r for r in _jsonl(finetuned / "metrics.jsonl") if "eval_accuracy" in r]
    assert len(evals) >= 2 and all(r["eval_n_examples"] == 19 for r in evals)
    best = max(evals, key=lambda r: r["eval_accuracy"])  # the first of equal values
    sel = summary["selected"]
    assert (sel["step"], sel["value"], sel["evaluations"]) == (best["step"], best["eval_accuracy"], len(evals))
    assert summary["checkpoint"].endswith(f"step{best['step']:07d}")
    assert (finetuned / "checkpoints" / f"step{best['step']:07d}" / "dapt_state.json").is_file()  # pinned
    later = [r for r in evals if r["step"] > best["step"]]
    assert len(later) == 3 if sel["stopped_early"] else len(later) < 3  # patience 3
    assert f"held-out accuracy ({best['eval_accuracy']:.6g} at step {best['step']}" in (
        finetuned / "model" / "README.md").read_text()
    cfg = json.loads((finetuned / "model" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert cfg["dapt"] == {"stage": "finetune", "max_seq_length": 64, "truncation": "head+tail", "head_tokens": 16}


def test_exported_classifier_works_in_transformers_pipeline(finetuned):
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(finetuned / "model"), device="cpu")
    preds = clf(["I loved every minute of it.", "I want those two hours back."])
    assert {p["label"] for p in preds} <= {"positive", "negative"} and all(0.5 <= p["score"] <= 1 for p in preds)


def test_evaluate_two_ranks_counts_each_example_once(finetuned, demo_files, base_env, tmp_path):
    import datasets
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dapt.data.classify import tokenize_for_classification

    proc = run_cli("evaluate.py", ["--model_name_or_path", finetuned, "--data_files", demo_files["test"],
                                   "--output_dir", tmp_path, "--eval_batch_size", "4"], base_env, ranks=2,
                   launcher="fork")
    assert_ok(proc)
    res = json.loads((tmp_path / "eval_results.json").read_text())
    assert res["n_examples"] == 37 and res["world_size"] == 2
    assert {"accuracy", "f1_macro", "confusion_matrix", "per_class"} <= set(res)
    assert (res["max_seq_length"], res["truncation"], res["head_tokens"]) == (64, "head+tail", 16)  # from the model
    assert "macro f1" in proc.stdout and "confusion matrix" in proc.stdout
    # the same predictions computed in one process
    tok = AutoTokenizer.from_pretrained(finetuned / "model")
    model = AutoModelForSequenceClassification.from_pretrained(finetuned / "model").eval()
    data = tokenize_for_classification(datasets.load_dataset("json", data_files=str(demo_files["test"]),
                                                             split="train"), tok, 64, "head+tail", 16)
    with torch.no_grad():
        preds = [int(model(input_ids=torch.tensor([ids])).logits.argmax()) for ids in data["input_ids"]]
    assert res["accuracy"] == pytest.approx(accuracy_score(data["label"], preds), abs=1e-12)
    assert res["f1_macro"] == pytest.approx(f1_score(data["label"], preds, average="macro"), abs=1e-12)


def test_finetune_zero2_bf16_and_export_command(tmp_path, tiny_model, demo_files, base_env):
    out = tmp_path / "run"
    args = ["--model_name_or_path", tiny_model, "--data_files", demo_files["train"], "--output_dir", out,
            "--ds_config", "ds_configs/zero2_bf16.json", "--max_seq_length", "64", "--head_tokens", "16",
            "--num_epochs", "1", "--truncation", "head", "--validation_split", "0", *COMMON]
    assert_ok(run_cli("finetune.py", args, base_env, ranks=2, launcher="fork"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["final_eval"] == {}
    # the export command on the run's checkpoint reproduces the stage's own export, weight for weight
    exported = tmp_path / "again"
    assert_ok(run_cli("export.py", ["--checkpoint", out, "--output_dir", exported], base_env, launcher="fork"))
    from safetensors.torch import load_file

    a, b = load_file(out / "model" / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["dapt"]["truncation"] == "head"


def test_no_shared_memory_left_behind(tmp_path, tiny_model, demo_files, base_env):
    """DeepSpeed's CPU allreduce buffers in /dev/shm are removed when the ranks exit (they leak
    otherwise, tens of MB per rank and run)."""
    import glob
    import re

    proc = _mlm(tmp_path / "run", tiny_model, demo_files, base_env, "ds_configs/zero2_auto.json", "fork", epochs=1)
    assert_ok(proc)
    # this run's buffers are named by its rendezvous port (other jobs on the machine may hold theirs)
    port = re.search(r"master [\d.]+:(\d+)", proc.stdout).group(1)
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []


def test_sparse_mlm_head_equals_the_dense_head_and_packing_can_be_off(tmp_path, tiny_model, demo_files, base_env):
    """The speed switches change cost, not results: the sparse head (projection at masked positions
    only) gives the dense head's per-step losses; unpacked MLM (padded rows) also trains."""
    runs = {}
    for name, flags in (("sparse", []), ("dense", ["--sparse_mlm_head", "false"]),
                        ("unpacked", ["--packing", "false"])):
        out = tmp_path / name
        args = ["--model_name_or_path", tiny_model, "--data_files", demo_files["unlabelled"], "--output_dir", out,
                "--ds_config", "ds_configs/zero2_auto.json", "--max_seq_length", "64", "--num_epochs", "1",
                "--learning_rate", "1e-3", "--warmup", "0.1", "--validation_split", "0.1", *COMMON, *flags]
        assert_ok(run_cli("mlm.py", args, base_env, ranks=2, launcher="fork"))
        runs[name] = {r["step"]: r for r in _jsonl(out / "metrics.jsonl")}
    sparse = {s: r["loss"] for s, r in runs["sparse"].items() if "loss" in r}
    dense = {s: r["loss"] for s, r in runs["dense"].items() if "loss" in r}
    assert sparse.keys() == dense.keys() and max(abs(sparse[s] - dense[s]) for s in sparse) < 1e-4
    unpacked = [r for r in runs["unpacked"].values() if "eval_loss" in r]
    assert unpacked and 0 < unpacked[-1]["eval_loss"] < 11


def test_pipeline_stage_under_the_real_deepspeed_launcher_stops_the_pipeline_on_failure(tmp_path, base_env,
                                                                                        monkeypatch, capfd):
    """dapt.jobs.pipeline.run_job as the pipeline calls it, with the real `deepspeed` launcher (the pipeline
    tests run their stages as forked ranks): 2 ranks of `python -m dapt export` from the caller's directory,
    a stage that fails (no checkpoint) ends the pipeline with the stage's exit code."""
    from dapt.errors import DaptError
    from dapt.jobs.pipeline import run_job

    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in base_env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DaptError, match="dapt export failed with exit code 2"):
        run_job("export", 2, ["--checkpoint", "nothing", "--output_dir", "exported"])
    out, err = capfd.readouterr()
    assert "--module dapt export --checkpoint nothing" in out  # the command, as the pipeline prints it
    assert "dapt: error: checkpoint not found" in err, err[-3000:]  # the rank's own one line, passed through
    assert not (tmp_path / "exported").exists()
