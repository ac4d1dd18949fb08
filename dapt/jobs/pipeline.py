"""The whole pipeline on one machine: MLM -> fine-tune -> evaluate -> export -> predict -> report.

Each stage runs as its own job under the `deepspeed` launcher (as on a cluster, where each is an
sbatch job), on every local accelerator, or on 2 CPU ranks when there is none. The directory layout
is dapt/layout.py's RunLayout, the same as slurm/pipeline.sh's.

A sweep (`run_sweep`: seeds x fine-tune learning rates) runs one MLM stage (or one per seed), then a
fine-tune and an evaluation per (learning rate, seed) into SweepLayout's `runs/lr<LR>-seed<S>/`, the
same directories as slurm/sweep.sh's, and summarises them (dapt/jobs/sweep.py).
"""
from __future__ import annotations

import math
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from deepspeed.accelerator import get_accelerator

import dapt
from dapt.config import FinetuneConfig, parse_config
from dapt.data.demo import write_demo_data
from dapt.distributed import free_port
from dapt.errors import DaptError
from dapt.eval.metrics import format_table
from dapt.io import read_json, write_jsonl
from dapt.jobs.report import make_report
from dapt.jobs.sweep import summarize
from dapt.layout import RunLayout, SweepLayout

EXAMPLES = [
    "A wonderful film: the acting is superb and the story kept me hooked until the very end.",
    "Dull and predictable. The dialogue is terrible and I want those two hours back.",
]


def default_ranks() -> int:
    acc = get_accelerator()
    return 2 if acc.device_name() == "cpu" else max(1, acc.device_count())


def deepspeed_launcher(ranks: int) -> list[str]:
    """`deepspeed --num_gpus N --master_port <free port>` of this interpreter's environment: its
    `deepspeed` script when it has one (a venv), else `python -m deepspeed.launcher.runner`, so the
    ranks run the same Python (and the same dapt) as the caller."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent))
    return [*([launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]),
            "--num_gpus", str(ranks), "--master_port", str(free_port())]


def deepspeed_command(stage: str, ranks: int) -> list[str]:
    """The launcher running `python -m dapt <stage>` on each rank: the installed package, never a file
    of a checkout. `stage` may be written as its launch/ script (`mlm.py`)."""
    return [*deepspeed_launcher(ranks), "--module", "dapt", stage.removesuffix(".py")]


def rank_env() -> dict[str, str]:
    """This environment, where the ranks' `python -m dapt` finds the dapt this process runs: an installed
    one is found anyway; a checkout that is not installed (`python launch/pipeline.py`) goes first on
    PYTHONPATH."""
    env = dict(os.environ)
    src = Path(dapt.__file__).resolve().parent.parent
    if src not in {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_job(stage: str, ranks: int, args: list[str]) -> None:
    """One stage under the deepspeed launcher, in the caller's directory (relative paths keep their meaning)."""
    cmd = [*deepspeed_command(stage, ranks), *args]
    print(f"\n==> {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=rank_env())
    if proc.returncode:
        raise DaptError(f"dapt {stage} failed with exit code {proc.returncode}")


def predict_examples(model_dir: Path, texts: Sequence[str]) -> list[dict]:
    """The exported folder through the stock transformers pipeline: what a user of the model sees."""
    from transformers import pipeline  # only here: the stages themselves do not need it in this process

    clf = pipeline("text-classification", model=str(model_dir), device="cpu")
    return [{"text": t, **clf(t, truncation=True)[0]} for t in texts]


def start_jobs(root: Path, demo: bool, overwrite: bool) -> dict[str, list[str]]:
    """Checks and set-up shared by a pipeline and a sweep: refuse a used `root`, write the demo data,
    one W&B group. Returns each stage's data flags."""
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise DaptError(f"output_dir {root} is not empty; pass --overwrite_output_dir to replace it")
    data: dict[str, list[str]] = {"mlm": [], "finetune": [], "evaluate": []}
    if demo:
        files = write_demo_data(RunLayout(root).data)
        data = {"mlm": ["--data_files", str(files["unlabelled"])], "finetune": ["--data_files", str(files["train"])],
                "evaluate": ["--data_files", str(files["test"])]}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # One W&B group for all the jobs (when W&B is on; dapt/observe/tracking.py), unless the caller set one.
    os.environ.setdefault("DAPT_WANDB_GROUP", f"{root.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return data


def run_pipeline(root: Path, config: str | None, demo: bool, ranks: int, overwrite: bool) -> dict:
    """Run the three jobs into `root` (RunLayout) and return the evaluation results."""
    run = RunLayout(root)
    data = start_jobs(root, demo, overwrite)
    common = ["--config", config] if config else []
    again = ["--overwrite_output_dir"] if overwrite else []
    start = time.perf_counter()
    run_job("mlm", ranks, [*common, *data["mlm"], "--output_dir", str(run.mlm.root), *again])
    run_job("finetune", ranks, [*common, *data["finetune"], "--model_name_or_path", str(run.mlm.root),
                                   "--output_dir", str(run.finetune.root), *again])
    run_job("evaluate", ranks, [*common, *data["evaluate"], "--model_name_or_path", str(run.finetune.root),
                                   "--output_dir", str(run.eval.root), *again])
    results = read_json(run.eval.results)
    examples = predict_examples(run.finetune.model, EXAMPLES)
    write_jsonl(examples, run.examples)
    print("\n" + format_table(results))
    for p in examples:
        print(f"{p['label']:>8} {p['score']:.3f}  {p['text']}")
    print(f"\npipeline finished in {time.perf_counter() - start:.0f}s on {ranks} rank(s)")
    print(f"eval results:    {run.eval.results}")
    print(f"exported models: {run.mlm.model} (MLM), {run.finetune.model} (classifier; model card: README.md)")
    print(f"report:          {make_report(root)['markdown']} (plots beside it)")
    return results


def sweep_grid(config: str | None, seeds: Sequence[int] | None,
               learning_rates: Sequence[float] | None) -> tuple[list[int], list[float]]:
    """The seeds and fine-tune learning rates of a sweep: as given, else the recipe's one value (so a
    seeds-only sweep still names its runs lr<LR>-seed<S>). Repeats are refused: two runs would share a
    directory."""
    recipe = parse_config(FinetuneConfig, "finetune", [*(["--config", config] if config else []), "--output_dir", "-"])
    seeds = list(seeds) if seeds else [recipe.seed]
    rates = list(learning_rates) if learning_rates else [recipe.learning_rate]
    for seed in seeds:
        if not 0 <= seed < 2**32:
            raise DaptError(f"seeds must be integers in [0, 2^32), got {seed}")
    for lr in rates:
        if not 0 < lr < math.inf:
            raise DaptError(f"learning_rates must be finite and > 0, got {lr:g}")
    if len(set(seeds)) != len(seeds):
        raise DaptError(f"seeds repeat a value: {' '.join(map(str, seeds))}")
    names = [f"{lr:g}" for lr in rates]  # the run directory's spelling (dapt/layout.py run_name)
    if len(set(names)) != len(names):
        raise DaptError(f"learning_rates repeat a value (as run names): {' '.join(names)}")
    return seeds, rates


def run_sweep(root: Path, config: str | None, demo: bool, ranks: int, overwrite: bool,
              seeds: Sequence[int], learning_rates: Sequence[float], mlm_per_seed: bool = False) -> dict:
    """MLM once (or once per seed), then per (learning rate, seed) a fine-tune with `--seed S
    --learning_rate LR` and its evaluation (SweepLayout), then the summary over the runs. Returns it."""
    sweep = SweepLayout(root)
    data = start_jobs(root, demo, overwrite)
    common = ["--config", config] if config else []
    again = ["--overwrite_output_dir"] if overwrite else []
    start = time.perf_counter()
    mlm_seeds: list[int | None] = list(seeds) if mlm_per_seed else [None]
    for seed in mlm_seeds:
        seeded = ["--seed", str(seed)] if seed is not None else []
        run_job("mlm", ranks, [*common, *data["mlm"], *seeded, "--output_dir", str(sweep.mlm(seed).root), *again])
    for lr in learning_rates:
        for seed in seeds:
            run = sweep.run(lr, seed)
            name = run.root.name  # W&B run names: the stage directories are called the same in every run
            run_job("finetune", ranks, [*common, *data["finetune"], "--seed", str(seed), "--learning_rate", repr(lr),
                                           "--model_name_or_path", str(sweep.mlm(seed if mlm_per_seed else None).root),
                                           "--output_dir", str(run.finetune.root), "--wandb_name", f"finetune-{name}",
                                           *again])
            run_job("evaluate", ranks, [*common, *data["evaluate"], "--model_name_or_path", str(run.finetune.root),
                                           "--output_dir", str(run.eval.root), "--wandb_name", f"evaluate-{name}",
                                           *again])
    # this sweep's runs only: an overwritten directory may still hold runs of an earlier grid
    summary = summarize(root, runs=[sweep.run(lr, seed).root for lr in learning_rates for seed in seeds])
    print("\n" + sweep.markdown.read_text())
    print(f"sweep of {len(summary['runs'])} runs finished in {time.perf_counter() - start:.0f}s on {ranks} rank(s)")
    print(f"summary: {sweep.results}, {sweep.markdown}, {sweep.plot}")
    return summary
