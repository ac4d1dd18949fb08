"""`dapt plan`: the reference recipe on 1 to 64 GPUs and 1 to 8 nodes, checked against the trainer's batch
rule, DeepSpeed's own memory estimators, the checkpoint and FLOP formulas, the recipe's data, and the
README's cluster table (each row re-run, so the table cannot drift). In-process except one run of the
real console script for the exit code and the one-line error."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess

import pytest
import torch
from conftest import BIN, ROOT, SHARED_IMDB

from dapt import cli
from dapt.commands.plan import main
from dapt.configs import find_ds_config
from dapt.data.batching import steps_per_epoch
from dapt.jobs import plan as P
from dapt.observe.throughput import PEAK_TFLOPS, model_flops_per_token

RECIPE = ["--config", str(ROOT / "recipes" / "imdb-bert-base.yaml")]
CAN_RUN = "1, 2, 4, 8, 16, 32, 64"
BERT_BASE_MLM, BERT_BASE_CLS = 109_514_298, 109_483_778  # bert-base-uncased with the MLM / 2-label head


def run(*args, stage: str = "all") -> list[P.JobPlan]:
    """`dapt plan` in this process: the plans it printed (mlm first, then finetune)."""
    return main([*RECIPE, "--stage", stage, *map(str, args)])


def fails(capsys, *args, stage: str = "all") -> str:
    """`dapt plan` that must exit 2 with one `dapt: error:` line; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run(*args, stage=stage)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dapt: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def shape(nodes: int, per_node: int, gpu: str = "H100") -> list[str]:
    return ["--nodes", str(nodes), "--gpus_per_node", str(per_node), "--gpu", gpu]


# --- batch and steps over 1 to 64 GPUs, 1 to 8 nodes ------------------------------------------------------

SHAPES = [(n, g) for n in range(1, 9) for g in (1, 2, 4, 8)] + [(1, g) for g in (3, 6, 12, 16, 24, 32, 48, 64)]


@pytest.mark.parametrize("nodes,per_node", SHAPES, ids=[f"{n}x{g}" for n, g in SHAPES])
def test_every_shape_runs_the_recipe_or_says_which_can(capsys, nodes, per_node):
    world = nodes * per_node
    if 64 % world:
        line = fails(capsys, *shape(nodes, per_node))
        assert f"cannot be split over {world} ranks" in line and CAN_RUN in line
        return
    mlm, ft = run(*shape(nodes, per_node))
    for p in (mlm, ft):
        assert p.world_size == world and p.micro * p.accumulation * world == 64 == p.effective
        # the largest micro batch within the recipe's 16 that divides a rank's share
        assert p.micro == max(d for d in range(1, 17) if (64 // world) % d == 0)
        assert bool(p.batch_note) == (p.micro != 16)
    # the effective batch is fixed, so the optimizer steps are the same on every shape
    assert (mlm.steps_per_epoch, mlm.total_steps, ft.steps_per_epoch, ft.total_steps) == (444, 1332, 382, 1146)


@pytest.mark.parametrize("nodes,per_node,gpu,micro,accumulation", [(2, 8, "H100", 4, 1), (1, 8, "A100", 8, 1),
                                                                (1, 1, "V100", 16, 4)])
def test_reference_shapes(nodes, per_node, gpu, micro, accumulation):
    for p in run(*shape(nodes, per_node, gpu)):
        assert (p.micro, p.accumulation, p.device, p.memory.fits) == (micro, accumulation, gpu, True)
        assert (f"micro_batch_size 16 -> {micro}" in p.batch_note) == (micro < 16)


def test_steps_follow_the_recipe_data():
    mlm, ft = run(*shape(1, 8, "A100"))
    # MLM: 50,000 unsupervised reviews, 2% held out, packed per 2,000-text map batch into blocks of 512
    assert (mlm.data.examples, mlm.data.held_out, mlm.data.train_examples) == (50_000, 1_000, 49_000)
    blocks = 24 * int(2000 * P.IMDB_MEAN_TOKENS // 512) + int(1000 * P.IMDB_MEAN_TOKENS // 512)
    assert mlm.data.rows == blocks and mlm.steps_per_epoch == steps_per_epoch(blocks, 64)
    assert mlm.data.rows_estimated and mlm.tokens_total == mlm.total_steps * 64 * 512
    assert (mlm.warmup_steps, mlm.epochs) == (500, 3)
    # fine-tune: one row per review of the 25,000 training reviews (exact), 500 held out
    assert (ft.data.rows, ft.data.rows_estimated, ft.steps_per_epoch) == (24_500, False, 24_500 // 64)
    assert ft.warmup_steps == 0 and ft.data.tokens_per_row == pytest.approx(264.94, rel=0.01)


def test_a_flag_and_the_recipe_resolve_as_in_the_stage(capsys):
    mlm, ft = run(*shape(1, 1, "A100"), "--effective_batch_size", 32, "--num_epochs", 1, "--max_samples", 10_000)
    assert (mlm.effective, mlm.epochs, mlm.data.examples, ft.data.examples) == (32, 1, 10_000, 10_000)
    assert (mlm.micro, mlm.accumulation) == (16, 2)
    (ft_only,) = run(*shape(1, 1, "A100"), "--head_tokens", 64, stage="finetune")
    run(*shape(1, 1, "A100"), "--head_tokens", 64)  # --stage all: a fine-tune flag goes to the fine-tune only
    assert "truncation" in fails(capsys, *shape(1, 1, "A100"), "--truncation", "head", stage="mlm")
    assert "unrecognized arguments: --nonsense" in fails(capsys, *shape(1, 1, "A100"), "--nonsense", 1)


# --- memory: DeepSpeed's estimators, buckets, activations -------------------------------------------------

def deepspeed_printout(fn, *args) -> dict[str, tuple[str, str]]:
    """DeepSpeed's *_all_cold estimator as printed: options -> (per CPU, per GPU) in its 2-decimal GB."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", out.getvalue(), re.M)
    return {opts.replace("OffloadDeviceEnum.", ""): (cpu, gpu) for cpu, gpu, opts in rows}


@pytest.mark.parametrize("nodes,per_node", [(1, 1), (1, 8), (2, 8), (8, 8), (1, 64)])
def test_memory_equals_deepspeeds_estimators(nodes, per_node):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    mlm, ft = run(*shape(nodes, per_node))
    assert (mlm.params, ft.params) == (BERT_BASE_MLM, BERT_BASE_CLS)
    largest = 30522 * 768 + 30522  # the MLM decoder: tied word embeddings + its bias
    z2 = deepspeed_printout(estimate_zero2_model_states_mem_needs_all_cold, BERT_BASE_MLM, per_node, nodes)
    z3 = deepspeed_printout(estimate_zero3_model_states_mem_needs_all_cold, BERT_BASE_MLM, largest, per_node, nodes)
    expected = {"ZeRO-2": z2["offload_optimizer=none"], "ZeRO-2 + offload optimizer": z2["offload_optimizer=cpu"],
                "ZeRO-3": z3["offload_param=none, offload_optimizer=none, zero_init=0"],
                "ZeRO-3 + offload optimizer": z3["offload_param=none, offload_optimizer=cpu, zero_init=0"],
                "ZeRO-3 + offload optimizer, params": z3["offload_param=cpu, offload_optimizer=cpu, zero_init=0"]}
    rows = {r.option: (f"{r.per_node_cpu_gib:.2f}", f"{r.per_gpu_gib:.2f}") for r in mlm.memory.rows}
    assert {k: rows[k] for k in expected} == expected
    # ZeRO-1: ZeRO-2's terms with the 16-bit gradients (2 bytes/param) unsharded
    zero1 = next(r for r in mlm.memory.rows if r.option == "ZeRO-1").per_gpu_gib * P.GiB
    world = nodes * per_node
    assert zero1 == pytest.approx(2 * BERT_BASE_MLM + 18 * BERT_BASE_MLM // world + 2 * BERT_BASE_MLM
                                  - 2 * BERT_BASE_MLM // world, abs=2)
    assert [r.option for r in mlm.memory.rows if r.configured] == ["ZeRO-2"]  # the recipe's zero2_fp16.json


def test_activations_buckets_and_the_fit_check():
    (mlm,) = run(*shape(1, 8, "A100"), stage="mlm")
    s, b, h, layers = 512, 8, 768, 12
    acts = layers * 34 * s * b * h + int(s * b * 0.15 * 30522 * (2 + 4))  # 16-bit, fused attention, sparse head
    assert mlm.memory.activations_gib * P.GiB == pytest.approx(acts)
    zero = json.loads((ROOT / "ds_configs" / "zero2_fp16.json").read_text())["zero_optimization"]
    bucket = zero["reduce_bucket_size"]
    assert mlm.memory.buffers_gib * P.GiB == bucket * 2 * 2  # reduce_bucket_size x 16-bit x 2 (overlap_comm)
    assert mlm.memory.total_gib == pytest.approx(mlm.memory.model_states_gib + mlm.memory.buffers_gib
                                                 + mlm.memory.activations_gib)
    # eager attention stores the s x s scores: + 5·a·s²·b per layer in 16-bit
    (eager,) = run(*shape(1, 8, "A100"), "--attn_implementation", "eager", stage="mlm")
    assert (eager.memory.activations_gib - mlm.memory.activations_gib) * P.GiB == pytest.approx(
        layers * 5 * 12 * s * s * b)
    # gradient checkpointing: each layer's input (s·b·h·2) and one layer's activations
    (ckpt,) = run(*shape(1, 8, "A100"), "--gradient_checkpointing", stage="mlm")
    assert ckpt.memory.activations_gib * P.GiB == pytest.approx(acts - (layers - 1) * 34 * s * b * h
                                                                 + layers * 2 * s * b * h)
    assert any("gradient checkpointing runs each forward pass twice" in h for h in ckpt.hints)
    # bert-large at micro 32 on a 15 GiB T4 does not fit; the hint's remedies do
    large = ["--model_name_or_path", "bert-large-uncased"]
    (big,) = run(*shape(1, 1, "T4"), *large, "--micro_batch_size", 32, stage="mlm")
    assert big.params > 330e6 and big.memory.fits is False and big.memory.total_gib > 0.9 * 15
    assert any("does not fit" in h and "--micro_batch_size" in h and "--gradient_checkpointing" in h
               for h in big.hints)
    (small,) = run(*shape(1, 1, "T4"), *large, "--micro_batch_size", 4, stage="mlm")
    assert small.memory.fits is True and (small.micro, small.accumulation) == (4, 16)
    (recompute,) = run(*shape(1, 1, "T4"), *large, "--micro_batch_size", 32, "--gradient_checkpointing", stage="mlm")
    assert recompute.memory.fits is True and recompute.micro == 32


# --- checkpoints, time, precision -------------------------------------------------------------------------

def test_checkpoint_size_count_and_disk():
    mlm, ft = run(*shape(1, 8, "A100"))
    c = mlm.checkpoint
    assert c.bytes_per_param == 14 and c.size_gib * P.GiB == pytest.approx(14 * BERT_BASE_MLM)
    assert (c.written, c.kept) == (5, 2)  # steps 500, 1000 and the 3 epoch ends (444, 888, 1332)
    assert c.disk_gib == pytest.approx(3 * c.size_gib + 4 * BERT_BASE_MLM / P.GiB)  # + one being written + export
    (z3,) = run(*shape(1, 8, "A100"), "--ds_config", "ds_configs/zero3_bf16.json", stage="mlm")
    assert z3.checkpoint.bytes_per_param == 12 and z3.zero_stage == 3
    (cpu,) = run(*shape(1, 2, "cpu"), "--ds_config", "ds_configs/zero2_auto.json", stage="mlm")
    assert cpu.precision == "fp32" and cpu.checkpoint.bytes_per_param == 16
    (no_steps,) = run(*shape(1, 8, "A100"), "--save_steps", 0, stage="finetune")
    assert (no_steps.checkpoint.written, no_steps.checkpoint.kept) == (3, 2)
    (best,) = run(*shape(1, 8, "A100"), "--select_best", "accuracy", "--eval_steps", 100, "--save_steps", 0,
                  stage="finetune")
    evals = {s for s in range(100, 1147, 100)} | {382, 764, 1146}
    assert (best.checkpoint.written, best.checkpoint.kept) == (len(evals), 3)  # keep_last 2 + the pinned best


def test_time_is_model_flops_over_peak_at_the_stated_mfu():
    from transformers import BertConfig, BertForMaskedLM

    (mlm,) = run(*shape(2, 8, "H100"), stage="mlm")
    (faster,) = run(*shape(2, 8, "H100"), "--mfu", 0.5, stage="mlm")
    # the same formula as the training log's MFU, and it works on meta tensors
    tiny = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    with torch.device("meta"):
        on_meta = BertForMaskedLM(tiny)
    assert model_flops_per_token(on_meta, 512) == model_flops_per_token(BertForMaskedLM(tiny), 512)
    assert mlm.time.flops_per_token == model_flops_per_token(P.meta_model(BertConfig(), "mlm"), 512)
    assert mlm.time.flops == mlm.time.flops_per_token * mlm.tokens_total
    assert mlm.time.seconds == pytest.approx(mlm.time.flops / (16 * PEAK_TFLOPS["H100 SXM"] * 1e12 * 0.35))
    assert faster.time.seconds == pytest.approx(mlm.time.seconds * 0.35 / 0.5)
    (cpu,) = run(*shape(1, 2, "cpu"), "--ds_config", "ds_configs/zero2_auto.json", stage="mlm")
    (cpu_peak,) = run(*shape(1, 2, "cpu"), "--ds_config", "ds_configs/zero2_auto.json", "--peak_tflops", 2,
                      stage="mlm")
    assert cpu.time.seconds is None and cpu.memory.fits is None
    assert cpu_peak.time.seconds == pytest.approx(cpu_peak.time.flops / (2 * 2e12 * 0.35))


@pytest.mark.parametrize("gpu,ds_config,precision,hint", [
    ("A100", "ds_configs/zero2_fp16.json", "fp16", True),  # the recipe's FP16 on a BF16 GPU: a hint
    ("H100", "ds_configs/zero2_auto.json", "bf16", False),
    ("V100", "ds_configs/zero2_auto.json", "fp16", False),
    ("T4", "ds_configs/zero2_fp16.json", "fp16", False),
    ("cpu", "ds_configs/zero2_auto.json", "fp32", False),
    ("L40S", "ds_configs/zero2_bf16.json", "bf16", False),
])
def test_precision_for_the_gpu(gpu, ds_config, precision, hint):
    (p,) = run(*shape(1, 1, gpu), "--ds_config", ds_config, stage="finetune")
    assert p.precision == precision
    assert any("supports BF16" in h for h in p.hints) == hint


def test_shapes_and_names_it_refuses(capsys):
    assert "does not support" in fails(capsys, *shape(1, 1, "V100"), "--ds_config", "ds_configs/zero2_bf16.json")
    line = fails(capsys, *shape(1, 1, "B200"))
    assert "unknown GPU 'B200'" in line and all(g in line for g in ("H100", "A100-80GB", "V100", "T4", "cpu"))
    assert ">= 1" in fails(capsys, *shape(0, 8))
    assert ">= 1" in fails(capsys, *shape(2, 0))
    assert "--mfu" in fails(capsys, *shape(1, 8), "--mfu", 1.5)
    assert "--gpu" in fails(capsys, "--nodes", 1)
    assert "pass --examples" in fails(capsys, *shape(1, 8), "--dataset_name", "someone/else")


def test_json_holds_the_same_numbers(capsys):
    capsys.readouterr()
    plans = run(*shape(2, 8, "H100"), "--json")
    doc = json.loads(capsys.readouterr().out)
    assert [p["stage"] for p in doc["plans"]] == ["mlm", "finetune"]
    assert doc["plans"] == [json.loads(json.dumps(p.as_dict())) for p in plans]
    mlm = doc["plans"][0]
    assert (mlm["micro"], mlm["accumulation"], mlm["world_size"], mlm["total_steps"]) == (4, 1, 16, 1332)
    assert mlm["memory"]["rows"][1]["option"] == "ZeRO-2" and mlm["memory"]["rows"][1]["configured"] is True


def test_text_output_names_what_is_estimated(capsys):
    capsys.readouterr()
    run(*shape(1, 8, "A100"))
    out = capsys.readouterr().out
    assert "micro 8 x accumulation 1 x 8 ranks" in out and "~1,332 optimizer steps" in out
    assert "= 1,146 optimizer steps" in out  # the fine-tune's are exact: no ~
    assert "DeepSpeed's estimators" in out and "fits" in out and "note: tokens per text" in out
    assert "all stages:" in out


# --- data sources -----------------------------------------------------------------------------------------

def test_local_files_are_counted_without_reading_them(tmp_path, demo_files, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["a review"] * 3000, "label": [0, 1] * 1500})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=500)
    (ft,) = run(*shape(1, 1, "A100"), "--data_files", tmp_path / "a.parquet", stage="finetune")
    assert (ft.data.examples, ft.data.train_examples) == (3000, 2940)
    assert any("pass --tokens_per_example" in n for n in ft.data.notes)
    (jl,) = run(*shape(1, 1, "A100"), "--data_files", demo_files["train"], "--effective_batch_size", 16,
                stage="finetune")
    assert jl.data.examples == 192
    (given,) = run(*shape(1, 1, "A100"), "--examples", 6400, "--tokens_per_example", 1024, stage="mlm")
    assert given.data.train_examples == 6400 - 128 and given.data.rows == (6400 - 128) * 2  # 2 blocks per text
    (tr,) = run(*shape(1, 1, "A100"), "--examples", 6400, "--tokens_per_example", 100, stage="finetune")
    assert tr.data.tokens_per_row == 100
    (tmp_path / "b.csv").write_text("text,label\nfine,1\n")
    assert "pass --examples" in fails(capsys, *shape(1, 1, "A100"), "--data_files", tmp_path / "b.csv")


def test_prepared_dir_gives_exact_rows(tmp_path, tiny_model, demo_files, capsys, monkeypatch):
    import datasets
    from transformers import AutoModelForMaskedLM

    from dapt.commands.prepare import parse_args
    from dapt.jobs.prepare import prepare

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    model = ["--model_name_or_path", tiny_model, "--max_seq_length", 48]
    manifest = prepare(*parse_args([str(a) for a in ["--stage", "mlm", "--output_dir", tmp_path / "mlm", *model,
                                                     "--data_files", demo_files["unlabelled"]]]))
    (p,) = run(*shape(1, 2, "cpu"), *model, "--prepared_dir", tmp_path / "mlm", "--effective_batch_size", 8,
               stage="mlm")
    blocks = manifest["splits"]["train"]["blocks"]
    assert (p.data.rows, p.data.rows_estimated, p.steps_per_epoch) == (blocks, False, blocks // 8)
    # the model's size from its own config.json, without its weights: the real model's count
    assert p.params == sum(t.numel() for t in AutoModelForMaskedLM.from_pretrained(tiny_model).parameters())
    line = fails(capsys, *shape(1, 2, "cpu"), *model, "--head_tokens", 12, "--prepared_dir", tmp_path / "mlm",
                 stage="finetune")
    assert "holds mlm data, not finetune" in line


@pytest.mark.skipif(not (SHARED_IMDB / "train.parquet").is_file(), reason="needs ../shared/data/imdb")
def test_imdb_length_constants_match_the_data(tokenizer_dir):
    """The stored mean and percentiles against a seeded sample of the real reviews, tokenised as dapt does."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from dapt.data.text import clean_text

    texts = pq.read_table(SHARED_IMDB / "train.parquet", columns=["text"]).column("text").to_pylist()
    sample = [texts[i] for i in np.random.default_rng(0).choice(len(texts), 2000, replace=False)]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths = np.array([len(x) for x in tok([clean_text(t) for t in sample], verbose=False)["input_ids"]])
    assert lengths.mean() == pytest.approx(P.IMDB_MEAN_TOKENS, rel=0.04)
    assert np.minimum(lengths, 512).mean() == pytest.approx(P.imdb_mean_truncated(512), rel=0.04)
    assert np.percentile(lengths, 50) == pytest.approx(P.IMDB_PERCENTILES[10], rel=0.05)
    # the stored exact means of the full split, and the interpolation's consistency with them
    assert P.imdb_mean_truncated(512) == pytest.approx(264.94, rel=0.01)
    assert P.imdb_mean_truncated(128) == pytest.approx(123.38, rel=0.01)
    assert P.imdb_mean_truncated(10**6) == pytest.approx(P.IMDB_MEAN_TOKENS)


# --- the README's cluster table ---------------------------------------------------------------------------

def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### Run it on a cluster")
    return text[start:text.index("\n## ", start)]


def table_rows() -> list[dict[str, str]]:
    lines = [ln for ln in readme_section().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split(" | ")))) for ln in lines[2:]]


def launcher_world_and_ds(line: str) -> tuple[int, str | None]:
    """Ranks a launcher line starts, and the DeepSpeed JSON it names (None: the recipe's)."""
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=.*", w))
    ds = env.get("DAPT_DS_CONFIG") or (words[words.index("--ds_config") + 1] if "--ds_config" in words else None)
    if words[0] == "python":
        return 1, ds
    if words[0] == "deepspeed":
        return int(words[words.index("--num_gpus") + 1]), ds
    sbatch = words[words.index("sbatch"):]
    nodes = int(next(w.split("=")[1] for w in sbatch if w.startswith("--nodes=")))
    script = (ROOT / next(w for w in sbatch if w.endswith(".sh"))).read_text()
    per_node = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", script).group(1))
    return nodes * per_node, ds


def test_readme_cluster_table_rows_are_what_dapt_plan_says(monkeypatch):
    monkeypatch.chdir(ROOT)
    rows = table_rows()
    assert [r["nodes x GPUs"] for r in rows] == ["1 x 1 V100", "1 x 1 A100", "1 x 8 A100", "2 x 8 H100"]
    for row in rows:
        command = shlex.split(row["checked by"].strip("`"))
        assert command[:2] == ["dapt", "plan"]
        mlm, ft = main(command[2:])
        assert row["nodes x GPUs"] == f"{mlm.nodes} x {mlm.per_node} {mlm.device}"
        assert row["precision"].split()[0] == mlm.precision.upper() == ft.precision.upper()
        assert row["micro x accumulation"] == f"{mlm.micro} x {mlm.accumulation}"
        assert row["optimizer steps, MLM / fine-tune"] == f"{mlm.total_steps:,} / {ft.total_steps:,}"
        assert row["memory per GPU, MLM"] == f"~{mlm.memory.total_gib:.1f} GiB of {mlm.memory.device_gib:g}"
        assert row["training steps, both stages, at 35% MFU"] == P.format_duration(mlm.time.seconds + ft.time.seconds)
        world, ds = launcher_world_and_ds(row["launcher line (MLM)"].strip("`"))
        assert world == mlm.world_size and find_ds_config(ds or "zero2_fp16").resolve() == \
            find_ds_config(mlm.ds_config).resolve()


def test_bucket_sizes_and_the_readme_numbers(tmp_path):
    """The shipped JSONs' buckets against DeepSpeed's default of 5e8 (one bucket, bigger than bert-base)."""
    shipped = json.loads((ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    (tmp_path / "default_buckets.json").write_text(json.dumps(
        {**shipped, "zero_optimization": {**shipped["zero_optimization"], "reduce_bucket_size": 5e8}}))
    (ours,) = run(*shape(2, 8, "H100"), "--ds_config", "ds_configs/zero2_bf16.json", stage="mlm")
    (default,) = run(*shape(2, 8, "H100"), "--ds_config", tmp_path / "default_buckets.json", stage="mlm")
    assert any("one bucket" in h for h in default.hints) and not any("one bucket" in h for h in ours.hints)
    paragraph = readme_section().split("**Bucket sizes across nodes.**")[1]
    assert f"take {ours.memory.buffers_gib:.2f} GiB per GPU instead of {default.memory.buffers_gib:.2f}" in \
        " ".join(paragraph.split())
    assert f"to {shipped['zero_optimization']['reduce_bucket_size']:.1e}".replace("e+0", "e") in paragraph


# --- the command ------------------------------------------------------------------------------------------

def test_registered_as_a_command(capsys):
    assert "plan" in cli.COMMANDS
    assert cli.main(["plan", *RECIPE, *shape(1, 8, "A100"), "--stage", "mlm"]) == 0
    assert capsys.readouterr().out.startswith("dapt plan: mlm of ")


def test_console_script_one_line_exit_2_and_clean_json(base_env):
    def dapt_plan(*args):
        return subprocess.run([str(BIN / "dapt"), "plan", "--config", "recipes/imdb-bert-base.yaml", *args], cwd=ROOT,
                              env=base_env, capture_output=True, text=True, timeout=300)

    proc = dapt_plan("--nodes", "3", "--gpus_per_node", "8", "--gpu", "H100")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dapt: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot be split over 24 ranks" in lines[0] and CAN_RUN in lines[0]
    # stdout is the plan alone (DeepSpeed's own log lines go to stderr): --json can be piped
    proc = dapt_plan("--nodes", "2", "--gpus_per_node", "8", "--gpu", "H100", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [(p["micro"], p["accumulation"]) for p in json.loads(proc.stdout)["plans"]] == [(4, 1), (4, 1)]
