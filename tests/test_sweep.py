"""Seeds and sweeps: `dapt summarize` (dapt/jobs/sweep.py) on hand-made runs, with every number
recomputed here; `launch/pipeline.py --seeds ... --learning_rates ...` for real (tiny model, 1 epoch);
and what slurm/sweep.sh submits (stand-in `sbatch`; the real cluster run is in test_slurm.py)."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_ok
from ranks import run as run_forked

from dapt.commands import pipeline as pipeline_cmd
from dapt.commands import summarize as summarize_cmd
from dapt.jobs.sweep import figure, summarize
from dapt.layout import SweepLayout, run_name

T975 = {1: 12.706204736174707, 2: 4.302652729911275, 9: 2.2621571627409915}  # Student-t 97.5% quantiles (tables)


def logit_t(values: list[float]) -> tuple[float, float]:
    """The summary's interval by hand: logit(mean) +- t * s / (sqrt(n) m (1 - m)), mapped back."""
    n, m, s = len(values), statistics.mean(values), statistics.stdev(values)
    half = T975[n - 1] * s / (math.sqrt(n) * m * (1 - m))
    centre = math.log(m / (1 - m))
    return 1 / (1 + math.exp(-(centre - half))), 1 / (1 + math.exp(-(centre + half)))


def fake_run(run_dir: Path, seed: int, lr: float, accuracy: float, f1: float, **config) -> Path:
    """A run as the stages leave it: finetune/run_config.json and eval/eval_results.json."""
    (run_dir / "finetune").mkdir(parents=True)
    (run_dir / "eval").mkdir()
    cfg = {"seed": seed, "learning_rate": lr, "output_dir": str(run_dir / "finetune"), "num_epochs": 3,
           "model_name_or_path": "runs/mlm", "wandb_name": f"finetune-{run_dir.name}", "warmup": 0.1, **config}
    (run_dir / "finetune" / "run_config.json").write_text(json.dumps({"stage": "classifier", "config": cfg}))
    results = {"accuracy": accuracy, "f1_macro": f1, "n_examples": 200, "set": "imdb-test",
               "accuracy_ci": [accuracy - 0.05, accuracy + 0.04], "f1_macro_ci": [f1 - 0.06, f1 + 0.05]}
    (run_dir / "eval" / "eval_results.json").write_text(json.dumps(results))
    return run_dir


GRID = {(2e-5, 1): (0.80, 0.79), (2e-5, 2): (0.82, 0.815), (2e-5, 3): (0.87, 0.86),
        (3e-5, 1): (0.90, 0.899), (3e-5, 2): (0.86, 0.85)}


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    for (lr, seed), (acc, f1) in GRID.items():
        fake_run(SweepLayout(root).run(lr, seed).root, seed, lr, acc, f1)
    # not runs: an exported model's copy of its results, and an evaluation without a fine-tune beside it
    (root / "runs" / run_name(2e-5, 1) / "finetune" / "model").mkdir()
    (root / "runs" / run_name(2e-5, 1) / "finetune" / "model" / "eval_results.json").write_text('{"accuracy": 0}')
    (root / "other" / "eval").mkdir(parents=True)
    (root / "other" / "eval" / "eval_results.json").write_text('{"accuracy": 0}')
    return root


def test_summary_numbers(sweep_dir):
    summary = summarize(sweep_dir)
    assert summary["setting_keys"] == ["learning_rate"]  # seed, output_dir, wandb_name differ but are no setting
    assert [(r["setting"]["learning_rate"], r["seed"]) for r in summary["runs"]] == sorted(GRID)
    for r in summary["runs"]:
        acc, f1 = GRID[(r["setting"]["learning_rate"], r["seed"])]
        assert (r["accuracy"], r["f1_macro"]) == (acc, f1)
        assert r["accuracy_ci"] == [acc - 0.05, acc + 0.04] and r["f1_macro_ci"] == [f1 - 0.06, f1 + 0.05]
        assert r["run"] == f"runs/{run_name(r['setting']['learning_rate'], r['seed'])}"
    settings = {s["setting"]["learning_rate"]: s for s in summary["settings"]}
    assert sorted(settings) == [2e-5, 3e-5]
    for lr, s in settings.items():
        for key, index in (("accuracy", 0), ("f1_macro", 1)):
            values = [v[index] for (lr_, _), v in sorted(GRID.items()) if lr_ == lr]
            n, mean, std = len(values), statistics.mean(values), statistics.stdev(values)
            got = s[key]
            assert got["n"] == n == s["n"] and got["method"] == "logit t"
            assert got["mean"] == pytest.approx(mean, abs=1e-12) and got["std"] == pytest.approx(std, abs=1e-12)
            assert (got["ci_low"], got["ci_high"]) == pytest.approx(logit_t(values), abs=1e-9)
            assert got["note"] == (None if n == 3 else "uninformative: n = 2 (< 3 seeds)")
    assert settings[2e-5]["seeds"] == [1, 2, 3] and settings[3e-5]["seeds"] == [1, 2]
    assert summary["confidence"] == 0.95 and summary["interval"]["method"] == "logit t"
    assert (summary["interval"]["min_seeds"], summary["interval"]["max_width"]) == (3, 0.2)
    # the files: the same summary, the tables, the plot
    layout = SweepLayout(sweep_dir)
    on_disk = json.loads(layout.results.read_text())
    assert on_disk["settings"] == json.loads(json.dumps(summary["settings"]))
    md = layout.markdown.read_text()
    s = settings[2e-5]["accuracy"]
    assert (f"| learning_rate=2e-05 | 3 | 1 2 3 | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}] (n = 3) |") in md
    s = settings[3e-5]["accuracy"]
    assert (f"| learning_rate=3e-05 | 2 | 1 2 | {s['mean']:.4f} ± {s['std']:.4f} | "
            f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}] (n = 2) **uninformative: n = 2 (< 3 seeds)** |") in md
    assert "| learning_rate=3e-05 | 1 | 200 | 0.9000 [0.8500, 0.9400] | 0.8990 [0.8390, 0.9490] | `runs/lr3e-05-seed1` |" in md
    assert layout.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_differing_key_is_part_of_the_setting(tmp_path):
    """warmup differs: a setting. Per-seed MLM start models (mlm-seed<S>) are one setting; another start
    model is another. One run alone: no spread, no interval."""
    root = tmp_path / "s"
    for seed, acc in ((1, 0.8), (2, 0.9)):
        fake_run(root / f"w1-{seed}", seed, 2e-5, acc, acc, model_name_or_path=f"/x/mlm-seed{seed}")
        fake_run(root / f"w2-{seed}", seed, 2e-5, acc - 0.1, acc - 0.1, warmup=0.2,
                 model_name_or_path=f"/x/mlm-seed{seed}")
    fake_run(root / "base-1", 1, 2e-5, 0.5, 0.5, model_name_or_path="bert-base-uncased")
    summary = summarize(root, output_dir=tmp_path / "out")
    assert summary["setting_keys"] == ["learning_rate", "model_name_or_path", "warmup"]
    by_label = {s["label"]: s for s in summary["settings"]}
    assert sorted(by_label) == ["learning_rate=2e-05, model_name_or_path=/x/mlm-seed*, warmup=0.1",
                                "learning_rate=2e-05, model_name_or_path=/x/mlm-seed*, warmup=0.2",
                                "learning_rate=2e-05, model_name_or_path=bert-base-uncased, warmup=0.1"]
    alone = by_label["learning_rate=2e-05, model_name_or_path=bert-base-uncased, warmup=0.1"]["accuracy"]
    assert alone == {"n": 1, "mean": 0.5, "std": None, "ci_low": None, "ci_high": None, "method": "logit t",
                     "note": "no interval: n = 1"}
    assert by_label["learning_rate=2e-05, model_name_or_path=/x/mlm-seed*, warmup=0.2"]["accuracy"]["mean"] == \
        pytest.approx(0.75)
    assert (tmp_path / "out" / "sweep_results.json").is_file() and not (root / "sweep_results.json").exists()
    assert "| 1 | 1 | 0.5000 ± - | no interval (n = 1) |" in (tmp_path / "out" / "sweep.md").read_text()


def test_intervals_stay_inside_0_1_at_n_2_3_10(tmp_path):
    """The issue's sweep (2 seeds, 0.9867 +- 0.0141: plain t [0.8596, 1.1137]) and three more settings: 3 seeds
    near 1 (plain t above 1), 3 seeds spread wide (uninformative by width), 10 seeds far from the bounds (the
    plain t interval, to second order), 1 seed. JSON, sweep.md and the plot's error bars all stay in [0, 1]."""
    grid = {2e-5: [0.9967, 0.9767], 3e-5: [0.97, 0.98, 0.99], 4e-5: [0.5, 0.7, 0.9],
            5e-5: [0.84, 0.86, 0.85, 0.87, 0.83, 0.88, 0.85, 0.86, 0.84, 0.87], 6e-5: [0.91]}
    for lr, values in grid.items():
        for seed, value in enumerate(values, 1):
            fake_run(tmp_path / "s" / run_name(lr, seed), seed, lr, value, value)
    summary = summarize(tmp_path / "s")
    by_lr = {s["setting"]["learning_rate"]: s for s in summary["settings"]}
    for lr, values in grid.items():
        for key in ("accuracy", "f1_macro"):
            got = by_lr[lr][key]
            assert got["n"] == len(values)
            if len(values) > 1:
                assert 0.0 <= got["ci_low"] < got["mean"] < got["ci_high"] <= 1.0
                assert (got["ci_low"], got["ci_high"]) == pytest.approx(logit_t(values), abs=1e-9)
    acc = {lr: by_lr[lr]["accuracy"] for lr in grid}
    assert acc[2e-5]["mean"] + T975[1] * acc[2e-5]["std"] / math.sqrt(2) == pytest.approx(1.1137, abs=1e-4)  # plain
    assert acc[2e-5]["note"] == "uninformative: n = 2 (< 3 seeds)"
    assert acc[3e-5]["note"] is None and acc[3e-5]["ci_high"] < 1.0 < 0.98 + T975[2] * 0.01 / math.sqrt(3)
    assert acc[4e-5]["note"] == f"uninformative: width {acc[4e-5]['ci_high'] - acc[4e-5]['ci_low']:.2f} (> 0.2)"
    assert acc[6e-5] == {"n": 1, "mean": 0.91, "std": None, "ci_low": None, "ci_high": None, "method": "logit t",
                         "note": "no interval: n = 1"}
    # 10 seeds far from the bounds: the plain t interval, up to |1 - 2m| half^2 / (2 m (1 - m)) (stats tests)
    m, half = acc[5e-5]["mean"], T975[9] * acc[5e-5]["std"] / math.sqrt(10)
    tolerance = 1.5 * abs(1 - 2 * m) * half**2 / (2 * m * (1 - m))
    assert (acc[5e-5]["ci_low"], acc[5e-5]["ci_high"]) == pytest.approx((m - half, m + half), abs=tolerance)
    assert acc[5e-5]["note"] is None
    md = SweepLayout(tmp_path / "s").markdown.read_text()
    assert "| learning_rate=6e-05 | 1 | 1 | 0.9100 ± - | no interval (n = 1) |" in md
    assert f"[{acc[2e-5]['ci_low']:.4f}, 1.0000] (n = 2) **uninformative: n = 2 (< 3 seeds)** |" in md
    assert "logit" in md and "fewer than 3 seeds or when wider than 0.2" in md
    # the plot: one error bar per setting with an interval, spanning exactly [ci_low, ci_high], n under each
    fig = figure(summary)
    for ax, key in zip(fig.axes, ("accuracy", "f1_macro")):
        bars = [c for c in ax.containers if c.has_yerr]
        with_ci = [s for s in summary["settings"] if s[key]["ci_low"] is not None]
        assert len(bars) == len(with_ci) == 4
        for bar, s in zip(bars, with_ci):
            (segment,) = bar.lines[2][0].get_segments()
            assert (segment[:, 1].min(), segment[:, 1].max()) == pytest.approx((s[key]["ci_low"], s[key]["ci_high"]))
            assert segment[:, 1].max() <= 1.0
            dashed = bar.lines[2][0].get_linestyle()[0][1] is not None  # (offset, dash pattern); None: solid
            assert dashed == (s[key]["note"] is not None)
        assert ax.get_ylim()[1] <= 1.01 and ax.get_ylim()[0] >= -0.01
        assert [t.get_text().rsplit("\n", 1)[1] for t in ax.get_xticklabels()] == \
            [f"n = {len(v)}" for v in grid.values()]
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_summarize_command_prints_its_files_and_fails_in_one_line(sweep_dir, tmp_path, capsys):
    summary = summarize_cmd.main([str(sweep_dir)])
    out = capsys.readouterr().out.splitlines()
    layout = SweepLayout(sweep_dir)
    assert out[0] == "5 runs in 2 setting(s); mean and 95% interval of the mean over n seeds (logit t, inside [0, 1]):"
    a, f = (summary["settings"][1][key] for key in ("accuracy", "f1_macro"))
    assert out[2] == (f"  learning_rate=3e-05: accuracy 0.8800 [{a['ci_low']:.4f}, {a['ci_high']:.4f}] (n = 2) "
                      f"uninformative: n = 2 (< 3 seeds); macro-F1 0.8745 [{f['ci_low']:.4f}, {f['ci_high']:.4f}] "
                      f"(n = 2) uninformative: n = 2 (< 3 seeds)")
    assert out[1].startswith("  learning_rate=2e-05: accuracy 0.8300 [") and "(n = 3);" in out[1]
    assert out[3:] == ["summary written:", f"  {layout.results}", f"  {layout.markdown}", f"  {layout.plot}"]
    (tmp_path / "empty").mkdir()
    for bad, message in ((tmp_path / "empty", f"no runs under {tmp_path / 'empty'}: a run is a directory with "
                                               "eval/eval_results.json and finetune/run_config.json"),
                         (tmp_path / "missing", f"sweep directory not found: {tmp_path / 'missing'}")):
        with pytest.raises(SystemExit) as exc:
            summarize_cmd.main([str(bad)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith(f"dapt: error: {message}"), err


def test_pipeline_sweep_bad_input_is_one_line(tmp_path, capsys):
    cases = {("--seeds", "1", "1"): "seeds repeat a value: 1 1",
             ("--seeds", "x"): "pipeline: argument --seeds: invalid int value: 'x'",
             ("--learning_rates", "2e-5", "0.00002"): "learning_rates repeat a value (as run names): 2e-05 2e-05",
             ("--learning_rates", "0"): "learning_rates must be finite and > 0, got 0",
             ("--mlm_per_seed",): "--mlm_per_seed needs --seeds (one MLM stage per seed)"}
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exc:
            pipeline_cmd.main(["--demo", "--output_dir", str(tmp_path / "x"), *args])
        assert exc.value.code == 2 and capsys.readouterr().err == f"dapt: error: {message}\n"
    assert not (tmp_path / "x").exists()  # refused before anything was written


# --- slurm/sweep.sh with stand-ins for sbatch, srun and scontrol -------------------------------------

def _stub(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(0o755)


def _script_env(tmp_path: Path, **more) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "DAPT_"))}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}", DAPT_VENV="none", DAPT_PYTHON=sys.executable,
               DAPT_CONFIG="")
    env.update({k: str(v) for k, v in more.items()})
    return env


def test_sweep_script_submits_one_array_and_a_summary(tmp_path):
    _stub(tmp_path / "bin", "sbatch", f'n=$(( $(cat {tmp_path}/n 2>/dev/null || echo 100) + 1 )); echo $n > {tmp_path}/n\n'
          f'echo "$n|$DAPT_SWEEP_ROLE|$DAPT_SEEDS|$DAPT_LEARNING_RATES|$DAPT_OUTPUT_DIR|$DAPT_WANDB_GROUP|$*" '
          f'>> {tmp_path}/calls; echo "$n;dapt"\n')
    env = _script_env(tmp_path, DAPT_SEEDS="1 02 3", DAPT_LEARNING_RATES="2e-5 3e-5", DAPT_GPUS_PER_NODE=0,
                      DAPT_SWEEP_CONCURRENCY=2, DAPT_OUTPUT_DIR="runs/s")
    proc = subprocess.run([str(ROOT / "slurm" / "sweep.sh"), "--time=5"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "array=101 summarize=102\n"
    array, summary = [line.split("|") for line in (tmp_path / "calls").read_text().splitlines()]
    out, script = tmp_path / "runs" / "s", str(ROOT / "slurm" / "sweep.sh")
    assert array[:5] == ["101", "task", "1 2 3", "2e-5 3e-5", str(out)] and array[5].startswith("s-")
    assert array[6].split() == ["--parsable", "--array=0-5%2", "--gres=none", "--time=5", script]
    assert summary[:6] == ["102", "summarize", "1 2 3", "2e-5 3e-5", str(out), array[5]]  # one W&B group
    assert summary[6].split()[:4] == ["--parsable", "--dependency=afterok:101", "--kill-on-invalid-dep=yes", "--time=5"]
    assert "--gres=none" in summary[6] and "--ntasks=1" in summary[6] and summary[6].endswith(script)
    assert (tmp_path / "logs").is_dir()


@pytest.mark.parametrize("variables, message", [
    ({}, 'DAPT_SEEDS is empty: list the fine-tune seeds, e.g. DAPT_SEEDS="1 2 3"'),
    ({"DAPT_SEEDS": "1 two"}, "DAPT_SEEDS=1 two: 'two' is not a seed (an integer in [0, 2^32))"),
    ({"DAPT_SEEDS": "1 01"}, "DAPT_SEEDS=1 01: seed 1 is listed twice"),
    ({"DAPT_SEEDS": "1", "DAPT_LEARNING_RATES": "2e-5 fast"}, "DAPT_LEARNING_RATES=2e-5 fast: 'fast' is not a number"),
    ({"DAPT_SEEDS": "1", "DAPT_LEARNING_RATES": "0.0"},
     "DAPT_LEARNING_RATES=0.0: learning rates must be > 0, got 0.0"),
    ({"DAPT_SEEDS": "1", "DAPT_SWEEP_CONCURRENCY": "0"},
     "DAPT_SWEEP_CONCURRENCY=0: expected a number of tasks running at once (>= 1)"),
    ({"DAPT_SEEDS": "1", "DAPT_FINETUNE_ARGS": "--num_epochs 1 --seed=4"},
     "DAPT_FINETUNE_ARGS sets --seed: the sweep sets it per task (DAPT_SEEDS, DAPT_LEARNING_RATES, DAPT_OUTPUT_DIR, "
     "DAPT_MODEL)"),
])
def test_sweep_script_bad_input_is_one_line(tmp_path, variables, message):
    _stub(tmp_path / "bin", "sbatch", f"touch {tmp_path}/submitted\n")
    proc = subprocess.run([str(ROOT / "slurm" / "sweep.sh")], cwd=tmp_path, env=_script_env(tmp_path, **variables),
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"dapt-slurm: error: {message}\n")
    assert not (tmp_path / "submitted").exists()


@pytest.mark.parametrize("srun_rc", [0, 75])
def test_sweep_task_runs_its_combination_and_requeues_on_75(tmp_path, srun_rc):
    """Task 3 of seeds (1 2) x rates (2e-5 3e-5) is lr 3e-5, seed 2: fine-tune then evaluate into the
    layout's run directory; a fine-tune that exits 75 requeues the task and the evaluation waits for its rerun."""
    _stub(tmp_path / "bin", "srun", f'printf "%s " "$@" >> {tmp_path}/sruns; echo >> {tmp_path}/sruns; exit {srun_rc}\n')
    _stub(tmp_path / "bin", "scontrol", f'echo "$*" >> {tmp_path}/scontrol\n')
    env = _script_env(tmp_path, DAPT_SWEEP_ROLE="task", DAPT_ROOT=ROOT, SLURM_JOB_ID=42, SLURM_ARRAY_JOB_ID=40,
                      SLURM_ARRAY_TASK_ID=3, SLURM_JOB_NODELIST="n1", DAPT_SEEDS="1 2", DAPT_LEARNING_RATES="2e-5 3e-5",
                      DAPT_OUTPUT_DIR=tmp_path / "s", DAPT_MODEL="/m", DAPT_EVAL_ARGS="--eval_batch_size 8")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "sweep.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = SweepLayout(tmp_path / "s").run(3e-5, 2)
    sruns = (tmp_path / "sruns").read_text().splitlines()
    assert f"sweep task 3 of array 40: learning rate 3e-5, seed 2 -> {run.root}" in proc.stdout
    assert f"-m dapt finetune --model_name_or_path /m --output_dir {run.finetune.root} --seed 2 --learning_rate 3e-5 " \
           f"--wandb_name finetune-lr3e-05-seed2" in sruns[0]
    if srun_rc == 75:
        assert len(sruns) == 1 and (tmp_path / "scontrol").read_text() == "requeue 42\n"
    else:
        assert len(sruns) == 2 and not (tmp_path / "scontrol").exists()
        assert sruns[1].endswith(f"-m dapt evaluate --model_name_or_path {run.finetune.root} --output_dir "
                                 f"{run.eval.root} --wandb_name evaluate-lr3e-05-seed2 --eval_batch_size 8 ")


# --- the local sweep, for real -----------------------------------------------------------------------

def tiny_recipe(path: Path, tiny_model: Path) -> Path:
    """recipes/demo.yaml, smaller: the tiny BERT, 96 reviews per stage, length 64, 1 epoch; the MLM stage
    with whole-word masking (its real run, for test_wwm.py: one job fewer)."""
    path.write_text(f"""model_name_or_path: {tiny_model}
ds_config: ds_configs/zero2_auto.json
max_seq_length: 64
max_samples: 96
micro_batch_size: 8
effective_batch_size: 16
eval_batch_size: 64
logging_steps: 2
validation_split: 0.1
save_steps: 0
mlm:
  num_epochs: 1
  learning_rate: 1.0e-3
  warmup: 0.1
  whole_word_mask: true
finetune:
  num_epochs: 1
  learning_rate: 5.0e-4
  warmup: 0.1
  head_tokens: 16
""")
    return path


def test_pipeline_two_seed_sweep(tmp_path, tiny_model, base_env):
    out = tmp_path / "sweep"
    recipe = tiny_recipe(tmp_path / "tiny.yaml", tiny_model)
    # the pipeline for real; its five stage jobs as forked ranks (the deepspeed launcher's own tests are elsewhere)
    proc = run_forked([str(ROOT / "launch" / "pipeline.py"), "--demo",
                       "--config", str(recipe), "--output_dir", str(out), "--num_gpus", "1",
                       "--seeds", "1", "2", "--learning_rates", "1e-3"], base_env, timeout=600, fork_stages=True)
    assert_ok(proc)
    sweep = SweepLayout(out)
    assert sweep.mlm().model.is_dir() and not (out / "mlm-seed1").exists()  # one shared MLM stage
    # ... trained with whole-word masking: finite training and held-out losses
    assert json.loads(sweep.mlm().run_config.read_text())["config"]["whole_word_mask"] is True
    records = [json.loads(line) for line in sweep.mlm().metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r] + [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    assert [r["eval_masked_tokens"] > 0 for r in records if "eval_loss" in r] == [True]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["lr0.001-seed1", "lr0.001-seed2"]
    accuracies, f1s = [], []
    for seed in (1, 2):
        run = sweep.run(1e-3, seed)
        cfg = json.loads(run.finetune.run_config.read_text())["config"]
        assert (cfg["seed"], cfg["learning_rate"], cfg["model_name_or_path"]) == (seed, 1e-3, str(sweep.mlm().root))
        results = json.loads(run.eval.results.read_text())
        assert results["n_examples"] == 96
        accuracies.append(results["accuracy"])
        f1s.append(results["f1_macro"])
    summary = json.loads(sweep.results.read_text())
    assert [r["accuracy"] for r in summary["runs"]] == accuracies and [r["seed"] for r in summary["runs"]] == [1, 2]
    (setting,) = summary["settings"]
    assert setting["setting"] == {"learning_rate": 1e-3} and setting["n"] == 2
    assert setting["accuracy"]["mean"] == pytest.approx(statistics.mean(accuracies), abs=1e-12)
    assert setting["accuracy"]["std"] == pytest.approx(statistics.stdev(accuracies), abs=1e-12)
    assert setting["f1_macro"]["mean"] == pytest.approx(statistics.mean(f1s), abs=1e-12)
    assert sweep.markdown.read_text().strip() in proc.stdout  # sweep.md is printed
    assert sweep.plot.is_file()
