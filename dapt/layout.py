"""Where a run's files are: the one definition of every path a stage, a pipeline or a Slurm pipeline writes.

    <pipeline dir>/                  RunLayout (launch/pipeline.py, slurm/pipeline.sh)
        data/                        the demo's generated reviews (--demo)
        mlm/                         StageLayout: stage 1's output dir
        finetune/                    StageLayout: stage 2's output dir
        eval/                        EvalLayout: the evaluation job's output dir
        report/                      `dapt report <pipeline dir>`
        examples.jsonl               the pipeline's example predictions
    <stage dir>/                     StageLayout
        checkpoints/<tag>/ latest    sharded checkpoints (dapt/train/checkpoint.py)
        metrics.jsonl run_config.json summary.json wandb_run_id wandb/
        model/                       the export (Hugging Face folder, model card README.md)
    <eval dir>/                      EvalLayout
        eval_results.json            one test set; several: eval_results-<name>.json + eval_table.md
        predictions.jsonl            per-example predictions (--save_predictions)
    <sweep dir>/                     SweepLayout (launch/pipeline.py --seeds/--learning_rates, slurm/sweep.sh)
        data/ mlm/                   as a pipeline's: the demo's reviews, the MLM stage shared by all runs
        mlm-seed<S>/                 one MLM stage per seed instead (--mlm_per_seed)
        runs/lr<LR>-seed<S>/         RunLayout per (fine-tune learning rate, seed): finetune/, eval/
        sweep_results.json sweep.md sweep.png   `dapt summarize <sweep dir>` (dapt/jobs/sweep.py)

`python -m dapt.layout DIR` prints the pipeline paths as shell assignments (for scripts);
`python -m dapt.layout DIR LR SEED` those of one sweep run.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

STAGES = ("mlm", "finetune")  # training stages, in pipeline order


@dataclass(frozen=True)
class StageLayout:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def run_config(self) -> Path:
        return self.root / "run_config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def wandb_run_id(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"

    # A directory holding only these (and no complete checkpoint) is a run that died before its first
    # checkpoint: it may be started again without --overwrite_output_dir.
    RUN_FILES = frozenset({"run_config.json", "metrics.jsonl", "checkpoints", "wandb_run_id", "wandb"})

    def is_stage(self) -> bool:
        return self.metrics.is_file()


@dataclass(frozen=True)
class EvalLayout:
    root: Path

    RESULTS = "eval_results.json"
    PREDICTIONS = "predictions.jsonl"

    @property
    def results(self) -> Path:
        return self.root / self.RESULTS

    def results_for(self, name: str | None) -> Path:
        """One test set: eval_results.json; a named set of several: eval_results-<name>.json."""
        return self.results if not name else self.root / f"eval_results-{name}.json"

    def predictions_for(self, name: str | None) -> Path:
        return self.root / (self.PREDICTIONS if not name else f"predictions-{name}.jsonl")

    @property
    def table(self) -> Path:
        return self.root / "eval_table.md"

    def result_files(self) -> list[Path]:
        """Every results file in the folder (the single set first, then named sets by name)."""
        if not self.root.is_dir():
            return []
        named = sorted(self.root.glob("eval_results-*.json"))
        return ([self.results] if self.results.is_file() else []) + named


@dataclass(frozen=True)
class RunLayout:
    """A pipeline's directory: its stages, its evaluation and its report."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def mlm(self) -> StageLayout:
        return StageLayout(self.root / "mlm")

    @property
    def finetune(self) -> StageLayout:
        return StageLayout(self.root / "finetune")

    @property
    def eval(self) -> EvalLayout:
        return EvalLayout(self.root / "eval")

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def examples(self) -> Path:
        return self.root / "examples.jsonl"

    def stage(self, name: str) -> StageLayout:
        return {"mlm": self.mlm, "finetune": self.finetune}[name]


def run_name(learning_rate: float, seed: int) -> str:
    """`lr<LR>-seed<S>`, the LR as C's printf %g writes it (2e-05, 0.0001), so that slurm/sweep.sh
    (`LC_ALL=C printf 'lr%g-seed%d'`) names a run exactly as launch/pipeline.py does."""
    return f"lr{learning_rate:g}-seed{seed}"


@dataclass(frozen=True)
class SweepLayout:
    """A sweep's directory: shared (or per-seed) MLM, one RunLayout per (learning rate, seed), the summary."""

    root: Path

    RUNS = "runs"
    RESULTS = "sweep_results.json"
    MARKDOWN = "sweep.md"
    PLOT = "sweep.png"

    @property
    def data(self) -> Path:
        return RunLayout(self.root).data

    def mlm(self, seed: int | None = None) -> StageLayout:
        """The MLM stage the runs start from: shared (seed None), or seed S's own (--mlm_per_seed)."""
        return RunLayout(self.root).mlm if seed is None else StageLayout(self.root / f"mlm-seed{seed}")

    def run(self, learning_rate: float, seed: int) -> RunLayout:
        return RunLayout(self.root / self.RUNS / run_name(learning_rate, seed))

    # The summary files; `dapt summarize DIR --output_dir OUT` writes them to SweepLayout(OUT).
    @property
    def results(self) -> Path:
        return self.root / self.RESULTS

    @property
    def markdown(self) -> Path:
        return self.root / self.MARKDOWN

    @property
    def plot(self) -> Path:
        return self.root / self.PLOT


def shell_assignments(root: Path) -> str:
    run = RunLayout(root)
    return "\n".join([f"mlm={run.mlm.root}", f"finetune={run.finetune.root}", f"eval={run.eval.root}",
                      f"report={run.report}"])


def sweep_run_assignments(root: Path, learning_rate: float, seed: int) -> str:
    run = SweepLayout(root).run(learning_rate, seed)
    return "\n".join([f"run={run.root}", f"finetune={run.finetune.root}", f"eval={run.eval.root}"])


if __name__ == "__main__":
    if len(sys.argv) == 2:
        print(shell_assignments(Path(sys.argv[1])))
    elif len(sys.argv) == 4:
        print(sweep_run_assignments(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])))
    else:
        print("usage: python -m dapt.layout PIPELINE_DIR | python -m dapt.layout SWEEP_DIR LR SEED", file=sys.stderr)
        sys.exit(2)
