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
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from dapt.errors import DaptError, first_line
from dapt.io import atomic_write_text
from dapt.layout import StageLayout

WANDB_MODES = ("auto", "online", "offline", "disabled")
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
    id_file = StageLayout(output_dir).wandb_run_id
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
            atomic_write_text(id_file, run.id + "\n")
        return WandbRun(run)
    except Exception as exc:  # noqa: BLE001 - W&B must never kill training
        _warn(f"W&B ({mode}) could not start ({type(exc).__name__}: {first_line(exc)}); training goes on without it")
        return WandbRun(None)


def fresh_start(output_dir: Path) -> None:
    """A run started from scratch gets a new W&B run (rank 0, before start_tracking)."""
    StageLayout(output_dir).wandb_run_id.unlink(missing_ok=True)


def log_evaluation(cfg: Any, output_dir: Path, results: Mapping[str, Any]) -> None:
    """The evaluation job's results as a W&B run of the pipeline's group (job type `evaluate`)."""
    mode = resolve_wandb_mode(getattr(cfg, "wandb_mode", "auto"))
    if mode == "disabled":
        return
    settings = {k: v for k, v in results.items() if k not in ("confusion_matrix", "per_class")}
    run = start_wandb(mode, project=cfg.wandb_project, group=wandb_group(cfg.wandb_group),
                      name=(cfg.wandb_name or f"evaluate-{Path(cfg.output_dir).resolve().name}")
                      + (f"-{results['set']}" if cfg.eval_sets else ""), job_type="evaluate",
                      config={"config": asdict(cfg), "results": settings}, output_dir=output_dir, resume=False,
                      keep_id=False)
    metrics = {k: results[k] for k in ("accuracy", "f1_macro", "n_examples", "accuracy_ci", "f1_macro_ci")
               if k in results}
    for name, scores in results.get("per_class", {}).items():
        metrics.update({f"{name}_{k}": v for k, v in scores.items()})
    run.summary({f"test_{k}": v for k, v in metrics.items()})
    names = list(results.get("per_class", {}))
    run.log_table("test_confusion_matrix", ["true \\ predicted", *names],
                  [[names[i], *row] for i, row in enumerate(results.get("confusion_matrix", []))])
    run.finish()
