"""What a user watching a job sees: Weights & Biases, and the console (a progress bar or plain lines).

Everything here runs on rank 0 only and never stops training: a W&B failure (no network, no
package, a bad key) prints one warning and the run goes on with W&B off.

W&B mode (`--wandb_mode`):
  * `auto` (default): `WANDB_MODE` when it is set (`online`, `offline`, `disabled`); otherwise
    `online` when an API key is configured (`WANDB_API_KEY`, or `wandb login`'s ~/.netrc entry), else
    `disabled`. A machine with no W&B set-up therefore never tries the network.
  * `online`, `offline` (clusters without internet: `wandb sync <dir>/wandb/offline-run-*` later),
    `disabled`.
W&B files go to `$WANDB_DIR` when set, else to `<output_dir>/wandb/`. The run id is kept in
`<output_dir>/wandb_run_id`, so a resumed stage (same output dir) continues the same W&B run. One
pipeline's stages share a W&B group: `--wandb_group`, else `$DAPT_WANDB_GROUP` (set by
launch/pipeline.py and the Slurm pipeline script).
"""
from __future__ import annotations

import importlib.util
import io
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from dapt.errors import DaptError, first_line

WANDB_MODES = ("auto", "online", "offline", "disabled")
PROGRESS_MODES = ("auto", "bar", "lines")
RUN_ID_FILE = "wandb_run_id"
GROUP_ENV = "DAPT_WANDB_GROUP"
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled", "disable": "disabled", "off": "disabled"}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _has_api_key(env: Mapping[str, str]) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = Path(env.get("NETRC", Path.home() / ".netrc"))
        return path.is_file() and any("wandb" in host for host in netrc.netrc(str(path)).hosts)
    except Exception:  # an unreadable or malformed netrc is not our business
        return False


def resolve_wandb_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """online, offline or disabled (see the module doc). An explicit online/offline without the
    wandb package is a configuration error; WANDB_MODE from the environment only warns."""
    env = os.environ if env is None else env
    explicit = mode != "auto"
    if not explicit:
        env_mode = env.get("WANDB_MODE", "").strip().lower()
        if env_mode:
            if env_mode not in _ENV_MODES:
                _warn(f"WANDB_MODE={env_mode!r} is not online, offline or disabled; W&B is off")
                return "disabled"
            mode = _ENV_MODES[env_mode]
        else:
            mode = "online" if _has_api_key(env) else "disabled"
    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        if explicit:
            raise DaptError(f"wandb_mode {mode} needs the wandb package: pip install 'dapt[wandb]' (or wandb)")
        _warn(f"W&B mode {mode} (from WANDB_MODE) but the wandb package is not installed; W&B is off")
        return "disabled"
    return mode


def wandb_group(configured: str, env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return configured or env.get(GROUP_ENV) or None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class WandbRun:
    """A W&B run that cannot fail loudly: every call is guarded, the first failure disables it."""

    def __init__(self, run: Any):
        self.run = run

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.run is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - W&B must never kill training
            _warn(f"W&B {what} failed ({type(exc).__name__}: {first_line(exc)}); "
                  f"W&B is off for the rest of this run (the local metrics.jsonl is complete)")
            self.run = None
            return None

    @property
    def id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, record: Mapping[str, Any]) -> None:
        self._guard("log", lambda: self.run.log({k: _jsonable(v) for k, v in record.items()}))

    def summary(self, values: Mapping[str, Any]) -> None:
        self._guard("summary", lambda: self.run.summary.update({k: _jsonable(v) for k, v in values.items()}))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        def do() -> None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)})

        self._guard("table", do)

    def finish(self, preempted: bool = False) -> None:
        def do() -> None:
            if preempted:
                self.run.mark_preempting()
            self.run.finish()

        self._guard("finish", do)
        self.run = None


def new_run_id() -> str:
    """8 characters of [a-z0-9], like W&B's own ids (its generator moved between wandb versions)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start_wandb(mode: str, *, project: str, group: str | None, name: str, job_type: str,
                config: Mapping[str, Any], output_dir: Path, resume: bool,
                keep_id: bool = True) -> WandbRun:
    """Start (or, with `resume` and a stored id, continue) a W&B run; WandbRun(None) when off or failed.

    `keep_id`: store the run id in `<output_dir>/wandb_run_id` (training stages, which resume)."""
    if mode == "disabled":
        return WandbRun(None)
    id_file = output_dir / RUN_ID_FILE
    try:
        import wandb

        run_id = None
        if keep_id and resume and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if run_id is None:
            run_id = new_run_id()
        kwargs: dict[str, Any] = {}
        if not os.environ.get("WANDB_DIR"):
            output_dir.mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(output_dir)
        run = wandb.init(mode=mode, project=project or os.environ.get("WANDB_PROJECT") or "dapt", group=group,
                         name=name, job_type=job_type, id=run_id, resume="allow", config=dict(config), **kwargs)
        # Our own step on the x axis: a resumed run repeats the steps after its last checkpoint, which
        # W&B's internal step counter would drop.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        if keep_id:
            id_file.write_text(run.id + "\n")
        return WandbRun(run)
    except Exception as exc:  # noqa: BLE001 - W&B must never kill training
        _warn(f"W&B ({mode}) could not start ({type(exc).__name__}: {first_line(exc)}); training goes on without it")
        return WandbRun(None)


# --- console --------------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A tqdm bar with ETA in a terminal; plain lines (one per logging step, with the ETA) otherwise,
    so Slurm logs hold no carriage-return noise."""

    def __init__(self, total_steps: int, initial_step: int, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.total, self.start_step = total_steps, initial_step
        self.started = time.perf_counter()
        self.bar = None
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.used_bar = mode == "bar" or (mode == "auto" and isatty())
        if self.used_bar:
            from tqdm.auto import tqdm

            try:  # a terminal that reports no size (some ptys) would hide the bar
                size = os.get_terminal_size(self.stream.fileno())
                sized = size.columns > 0 and size.lines > 0
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                sized = False
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", file=self.stream,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
                            smoothing=0.05, desc="train")

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def write(self, record: Mapping[str, Any], line: str) -> None:
        if self.used_bar and "loss" in record:  # train records: on the bar, not above it
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                if record.get("step", 0) >= self.total:  # done: what follows (eval, export) prints below it
                    self.close()
            return
        if self.bar is None:
            if "grad_norm" in record:
                line += f" grad_norm {record['grad_norm']:.3g}"
            if "loss" in record and record.get("step", 0) < self.total:
                line += f" eta {format_duration(self.eta_seconds(record['step']))}"
            print(line, file=self.stream, flush=True)
        else:
            self.bar.write(line, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None


class Tracker:
    """Rank 0's sinks besides metrics.jsonl: W&B and the console. MetricsLog calls it."""

    def __init__(self, wandb_run: WandbRun, progress: Progress | None):
        self.wandb = wandb_run
        self.progress = progress

    def log(self, record: Mapping[str, Any], line: str) -> None:
        self.wandb.log(record)
        if self.progress is not None:
            self.progress.write(record, line)
        else:
            print(line, flush=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.advance(step)

    def finish(self, summary: Mapping[str, Any] | None = None, preempted: bool = False) -> None:
        if self.progress is not None:
            self.progress.close()
        if summary:
            flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
            flat.update({f"final_{k}": v for k, v in (summary.get("final_eval") or {}).items() if k != "step"})
            self.wandb.summary(flat)
        self.wandb.finish(preempted=preempted)


def start_tracking(cfg: Any, output_dir: Path, stage: str, run_config: Mapping[str, Any], resumed: bool,
                   total_steps: int, initial_step: int) -> Tracker:
    """For a training stage on rank 0: W&B (per cfg.wandb_*) with the resolved config, and progress."""
    mode = resolve_wandb_mode(getattr(cfg, "wandb_mode", "auto"))
    run = start_wandb(mode, project=getattr(cfg, "wandb_project", ""), group=wandb_group(getattr(cfg, "wandb_group", "")),
                      name=getattr(cfg, "wandb_name", "") or f"{stage}-{output_dir.resolve().name}",
                      job_type=stage, config=run_config, output_dir=output_dir, resume=resumed)
    if mode != "disabled" and run.id:
        where = os.environ.get("WANDB_DIR") or str(output_dir)
        print(f"[{stage}] W&B {mode} run {run.id}" + (f" (group {wandb_group(getattr(cfg, 'wandb_group', ''))})"
              if wandb_group(getattr(cfg, "wandb_group", "")) else "")
              + (f"; sync later: wandb sync {where}/wandb/offline-run-*-{run.id}" if mode == "offline" else ""),
              flush=True)
    return Tracker(run, Progress(total_steps, initial_step, getattr(cfg, "progress", "auto")))


def fresh_start(output_dir: Path) -> None:
    """A run started from scratch gets a new W&B run (rank 0, before start_tracking)."""
    (output_dir / RUN_ID_FILE).unlink(missing_ok=True)


def log_evaluation(cfg: Any, output_dir: Path, results: Mapping[str, Any]) -> None:
    """The evaluation job's results as a W&B run of the pipeline's group (job type `evaluate`)."""
    mode = resolve_wandb_mode(getattr(cfg, "wandb_mode", "auto"))
    if mode == "disabled":
        return
    from dataclasses import asdict

    settings = {k: v for k, v in results.items() if k not in ("confusion_matrix", "per_class")}
    run = start_wandb(mode, project=cfg.wandb_project, group=wandb_group(cfg.wandb_group),
                      name=cfg.wandb_name or f"evaluate-{Path(cfg.output_dir).resolve().name}", job_type="evaluate",
                      config={"config": asdict(cfg), "results": settings}, output_dir=output_dir, resume=False,
                      keep_id=False)
    metrics = {"accuracy": results["accuracy"], "f1_macro": results["f1_macro"], "n_examples": results["n_examples"]}
    for name, scores in results.get("per_class", {}).items():
        metrics.update({f"{name}_{k}": v for k, v in scores.items()})
    run.summary({f"test_{k}": v for k, v in metrics.items()})
    names = list(results.get("per_class", {}))
    run.log_table("test_confusion_matrix", ["true \\ predicted", *names],
                  [[names[i], *row] for i, row in enumerate(results.get("confusion_matrix", []))])
    run.finish()


def grad_norm_of(engine: Any) -> float | None:
    """The global gradient norm of the engine's last optimizer step (before clipping), if known."""
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - older engines / optimizers without it
        return None
    if g is None:
        return None
    g = float(g.item() if hasattr(g, "item") else g)
    return g if math.isfinite(g) and g >= 0 else None  # fp16 overflow steps report inf / -1
