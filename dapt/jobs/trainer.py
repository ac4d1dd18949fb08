"""The one training loop both stages share, on the DeepSpeed engine.

A stage supplies a `Task` (dapt/train/tasks.py: its data, loss, evaluation and probe input); the
Trainer owns the rest: output-dir safety, resume, the engine, accumulation, schedule, logging,
evaluation, checkpoints, stop signals and export.

    Trainer(cfg, stage).run()    check inputs -> set up (or resume) -> train() -> export
    train()                      epochs of train_step(); evaluate(), save() and the stop check between steps

A stop signal saves a checkpoint and raises `StopRequested` (the command exits 75); nothing here
calls sys.exit.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from dapt.config import TrainConfig, head_warmup_steps, to_dict, warmup_steps
from dapt.data.batching import make_loader, steps_per_epoch, to_device, train_batches
from dapt.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    launcher_world_size,
    setup_distributed,
    shutdown,
)
from dapt.errors import DaptError, StopRequested, TrainingFailed
from dapt.io import dump_json, read_json
from dapt.layout import StageLayout
from dapt.model.export import export_checkpoint, logits_of, save_hf_meta
from dapt.model.loading import enable_gradient_checkpointing, load_config, load_tokenizer, resolve_model
from dapt.model.settings import check_length
from dapt.observe.metrics_log import MetricsLog, open_metrics_log
from dapt.observe.throughput import model_flops_per_token, peak_flops
from dapt.observe.tracking import fresh_start
from dapt.train import checkpoint as ckpt
from dapt.train.engine import (
    build_ds_config,
    grad_norm_of,
    load_ds_config,
    offloads_optimizer,
    param_groups,
    precision_of,
    set_seed,
    zero_stage,
)
from dapt.train.batch_plan import BatchPlan, plan_batch
from dapt.train.head_warmup import HeadWarmup
from dapt.train.optim import choose_optimizer, make_optimizer
from dapt.train.selection import Selection
from dapt.train.tasks import Stage, Task
from dapt.version import __version__

Batch = dict[str, torch.Tensor]


@dataclass
class TrainState:
    position: ckpt.TrainPosition
    history: list[dict[str, Any]] = field(default_factory=list)  # evaluation records of this job


@dataclass
class Window:
    """What happened since the last logged step (summed over micro-batches; all-reduced when logged)."""

    loss_sum: torch.Tensor  # on the device: read (a host sync) only when logging
    loss_count: int = 0
    tokens: int = 0
    samples: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.loss_count = self.tokens = self.samples = self.steps = 0
        self.started = time.perf_counter()


def guard_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds a previous run (or anything else), unless told to."""
    if not out.exists() or overwrite:
        return
    entries = {p.name for p in out.iterdir()}
    if entries and not entries <= StageLayout.RUN_FILES:
        raise DaptError(f"output_dir {out} is not empty (a previous run?); pass --overwrite_output_dir "
                        f"to replace it or choose another directory")


def real_tokens(batch: Batch) -> int:
    """Non-padding tokens of a host-side batch (packed MLM batches carry no mask: all are real)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


SIGNAL_SLOTS = 65  # signal numbers 1..64, one slot each in the step's all-reduce


def step_sync(stop: ckpt.StopFlag, targets: int, info: DistInfo) -> tuple[int, int]:
    """The optimizer step's one blocking collective: (the largest stop signal any rank got, 0 if none;
    the step's loss-target count over all ranks). One all-reduce of SIGNAL_SLOTS + 1 numbers instead of
    two round trips. Ranks act on the returned signal, never on their own flag, which a signal may set
    on one rank after the all-reduce (it counts at the next one)."""
    vec = torch.zeros(SIGNAL_SLOTS + 1, dtype=torch.float64)
    signum = stop.signum or 0
    if signum:
        vec[min(signum, SIGNAL_SLOTS - 1)] = 1
    vec[-1] = targets
    total = all_reduce_sum(vec, info)
    seen = total[:-1].nonzero().flatten()
    return (int(seen[-1]) if len(seen) else 0), int(total[-1])


def loader_workers(requested: int, device: torch.device) -> int:
    """-1 (auto): 2 workers on accelerators (the next micro-batches are collated while the device computes),
    none on CPU (the ranks already use every core)."""
    return requested if requested >= 0 else (0 if device.type == "cpu" else 2)


class Trainer:
    """One stage's training job. Attributes set by `setup()` are the run's state."""

    def __init__(self, cfg: TrainConfig, stage: Stage):
        self.cfg, self.stage = cfg, stage
        self.layout = StageLayout(Path(cfg.output_dir))

    # --- the job ------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Validate, train (or resume), checkpoint and export. Returns the run summary."""
        resume_from = self.check_inputs()
        done = self.finished_summary(resume_from)
        if done is not None:
            print(f"{self.layout.root}: this run already finished (model exported from {resume_from}); "
                  "nothing to do", flush=True)
            return done
        try:
            self.setup(resume_from)
            self.train()
            summary = self.export()
        except StopRequested:
            if self.info.is_main:
                print(f"[{self.task.arch}] stopped by signal {self.stop.signum} at step {self.position.step}; "
                      "checkpoint saved; exit 75 (requeue me)", flush=True)
            self.log.finish(preempted=True)
            self.close()
            raise
        except BaseException:
            self.close(barrier_first=False)  # no barrier: another rank may not have got this far
            raise
        self.close()
        return summary

    def check_inputs(self) -> Path | None:
        """Everything that can be checked without data or a process group fails first, writing nothing.
        Returns the checkpoint to resume from (None: a fresh start)."""
        cfg = self.cfg
        self.ds_raw = load_ds_config(cfg.ds_config)
        # The world size the launcher announces: a batch it cannot run fails here, before the rendezvous.
        world = launcher_world_size()
        self.batch: BatchPlan | None = (plan_batch(cfg.effective_batch_size, cfg.micro_batch_size, world)
                                        if world else None)
        choose_optimizer(cfg.optimizer, get_accelerator().device_name(), offloads_optimizer(self.ds_raw))
        self.model_path = resolve_model(cfg.model_name_or_path)
        check_length(cfg.max_seq_length, getattr(load_config(self.model_path), "max_position_embeddings", None))
        out = self.layout.root
        fresh = cfg.overwrite_output_dir and cfg.resume == "auto"
        resume_from = None if fresh else ckpt.find_resume(out, cfg.resume)
        if resume_from is None:
            guard_output_dir(out, cfg.overwrite_output_dir)
        return resume_from

    def finished_summary(self, resume_from: Path | None) -> dict[str, Any] | None:
        """The summary of a run whose export of its final checkpoint already completed."""
        summary = read_json(self.layout.summary, {})
        if resume_from is None or not summary or not self.layout.model.is_dir():
            return None
        if summary.get("final_checkpoint", summary.get("checkpoint")) != str(resume_from):
            return None
        done_epochs = ckpt.validate(resume_from).epoch
        if done_epochs < self.cfg.num_epochs and not summary.get("selected", {}).get("stopped_early"):
            # Its learning rate already decayed to zero over its own length: more epochs are a new run.
            raise DaptError(f"{self.layout.root} is a finished run of {done_epochs} epoch(s); num_epochs "
                            f"{self.cfg.num_epochs} would extend it past its schedule: start a new run from its "
                            f"model (--model_name_or_path {self.layout.model}) in another output_dir")
        return summary

    def setup(self, resume_from: Path | None) -> None:
        """Process group, data, DeepSpeed config and engine; then the restored state and the log."""
        cfg = self.cfg
        self.info = info = setup_distributed()
        self.stop = ckpt.StopFlag()
        self.tokenizer = load_tokenizer(self.model_path)
        self.task: Task = self.stage.build_task(cfg, info, self.tokenizer)
        self.per_epoch = steps_per_epoch(self.task.n_train, cfg.effective_batch_size)
        self.total_steps = self.per_epoch * cfg.num_epochs
        self.head_warmup = head_warmup_steps(cfg, self.total_steps)
        if self.head_warmup >= self.total_steps:
            raise DaptError(f"head_warmup_steps {cfg.head_warmup_steps:g} is {self.head_warmup} optimizer steps, not "
                            f"fewer than the run's {self.total_steps} ({self.per_epoch} steps/epoch x "
                            f"{cfg.num_epochs} epochs): the encoder would never train")
        if self.batch is None or self.batch.world_size != info.world_size:  # only the MPI library knew it
            self.batch = plan_batch(cfg.effective_batch_size, cfg.micro_batch_size, info.world_size)
        if self.batch.shrunk and info.is_main:
            print(f"dapt: {self.batch.note()}", flush=True)
        self.ds_cfg = build_ds_config(cfg, self.ds_raw, cfg.ds_config, self.batch, self.total_steps)
        self.accum = self.batch.accumulation
        self.precision = precision_of(self.ds_cfg)
        saved_world = ckpt.validate(resume_from).world_size if resume_from else info.world_size
        if resume_from is not None and saved_world != info.world_size:
            resume_from = ckpt.to_universal(resume_from, info)  # re-partition ZeRO state for the new world size
            self.ds_cfg["checkpoint"] = {**self.ds_cfg.get("checkpoint", {}), "load_universal": True}
        self.engine = self.build_engine(fresh=resume_from is None)
        self.ckpts = ckpt.CheckpointManager(self.layout.checkpoints, info, cfg.keep_last, cfg.pin_checkpoints,
                                            self.write_meta)
        self.state = TrainState(ckpt.TrainPosition(world_size=info.world_size,
                                                   effective_batch_size=cfg.effective_batch_size, seed=cfg.seed))
        self.selection = Selection(cfg.select_best, cfg.early_stopping_patience)
        self.saved_step = -1  # the step of the last checkpoint this job wrote or resumed from
        if resume_from is not None:
            self.restore(resume_from, same_world=saved_world == info.world_size)
        self.log = self.open_log(resume_from) if info.is_main else MetricsLog(None)

    def build_engine(self, fresh: bool) -> Any:
        """The model (and what its checkpoint held of the head), the head warm-up, the optimizer, the engine."""
        cfg, info = self.cfg, self.info
        # The same seed on every rank: newly initialised weights (a new head) must be identical on all
        # ranks, and two runs of one config must be the same run.
        set_seed(cfg.seed)
        model, self.head_report = self.stage.load_model(cfg, self.model_path)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        head = self.head_report.head if self.head_warmup and self.head_report else None
        if self.head_warmup and not head:
            raise DaptError(f"head_warmup_steps: {type(model).__name__} has no head parameters apart from its "
                            "base model to warm up")
        optimizer, self.optimizer_name = make_optimizer(cfg, param_groups(model, cfg.weight_decay, head),
                                                        info.device.type, offloads_optimizer(self.ds_cfg))
        # The encoder and embeddings frozen for the first head_warmup steps (None: no warm-up).
        self.warmup: HeadWarmup | None = None
        if head:
            self.warmup = HeadWarmup(self.head_warmup, [p for n, p in model.named_parameters()
                                                        if n not in head and p.requires_grad])
            self.warmup.wrap(optimizer)
        if info.is_main and fresh:  # a resumed run's head comes from its checkpoint
            self.report_head()
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_cfg)
        return engine

    def report_head(self) -> None:
        """One line when the MLM head is new or warmed up: which tensors, and what happens to them."""
        report, steps = self.head_report, self.head_warmup
        line = report.line() if report else None
        if steps:
            tied = " (and so the tied decoder)" if report.tied_decoder else ""
            line = f"{line or 'mlm head: loaded from the checkpoint'}; head warm-up: steps 1-{steps} train only " \
                   f"the head, the encoder and word embeddings{tied} stay frozen until then"
        elif line:
            line += "; --head_warmup_steps N would train it alone first"
        if line:
            print(line, flush=True)

    def restore(self, tag_dir: Path, same_world: bool) -> None:
        cfg = self.cfg
        saved_warmup = ckpt.read_state(tag_dir).get("head_warmup_steps", 0)
        if saved_warmup != self.head_warmup:  # the phase of each step, and the optimizer's groups, differ
            raise DaptError(f"checkpoint {tag_dir} was trained with {saved_warmup} head warm-up steps; this run "
                            f"has {self.head_warmup} (head_warmup_steps {cfg.head_warmup_steps:g}): resume with "
                            "the same value or start a new run")
        pos = self.ckpts.load(self.engine, tag_dir, same_world)
        if (pos.effective_batch_size, pos.seed) != (cfg.effective_batch_size, cfg.seed):
            raise DaptError(f"checkpoint {tag_dir} was trained with effective_batch_size "
                            f"{pos.effective_batch_size} and seed {pos.seed}; this run has "
                            f"{cfg.effective_batch_size} and {cfg.seed}")
        self.state.position = ckpt.TrainPosition(**{**asdict(pos), "world_size": self.info.world_size})
        self.ds_cfg.get("checkpoint", {}).pop("load_universal", None)
        self.selection.load_state_dict(ckpt.read_state(tag_dir).get("selection"))
        if self.selection.best_step is not None:
            self.ckpts.pin(ckpt.tag_for(self.selection.best_step))
        self.resumed_from = tag_dir
        self.saved_step = self.position.step

    def open_log(self, resume_from: Path | None) -> MetricsLog:
        """Rank 0: a fresh start clears a previous run's files; the run config and a banner; the log."""
        cfg, out, layout = self.cfg, self.layout.root, self.layout
        if resume_from is None:
            for stale in (layout.checkpoints, layout.metrics, layout.summary):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        run_config = {"dapt_version": __version__, "stage": self.task.arch, "config": to_dict(cfg),
                      "deepspeed": self.ds_cfg, "world_size": self.info.world_size, "batch": self.batch.as_dict(),
                      "device": str(self.info.device), "precision": self.precision, "optimizer": self.optimizer_name,
                      "model": self.model_path,
                      **({"mlm_head": self.head_report.as_dict()} if self.head_report else {}),
                      **({"head_warmup_steps": self.head_warmup} if self.head_warmup else {})}
        dump_json(run_config, layout.run_config)
        total, warmup = self.total_steps, warmup_steps(cfg, self.total_steps)
        if warmup > total:
            print(f"warning: warmup of {warmup} steps exceeds the {total} steps of this run; the learning "
                  "rate peaks at the last step", flush=True)
        print(f"[{self.task.arch}] {self.task.n_train} train examples, {self.per_epoch} steps/epoch x "
              f"{cfg.num_epochs} epochs = {total} steps; batch {self.batch.micro} x {self.accum} accumulation "
              f"x {self.info.world_size} rank(s) = {cfg.effective_batch_size}; warmup "
              f"{self.ds_cfg['scheduler']['params']['warmup_num_steps']} steps; ZeRO-{zero_stage(self.ds_cfg)} "
              f"{self.precision} on {self.info.device} ({self.info.backend}), {self.optimizer_name}"
              + (f"; head warm-up {self.head_warmup} steps" if self.head_warmup else "")
              + (f"; resumed from {resume_from} at step {self.position.step}" if resume_from else ""), flush=True)
        if resume_from is None:
            fresh_start(out)  # a new run gets a new W&B run; a resumed one continues its own
        log = open_metrics_log(cfg, layout, self.task.export_settings().get("stage", self.task.arch),
                               run_config, resume_from is not None, total, self.position.step)
        log.truncate_after(self.position.step)
        return log

    @property
    def position(self) -> ckpt.TrainPosition:
        return self.state.position

    def close(self, barrier_first: bool = True) -> None:
        """Leave the process group (after the others, normally) and put back the signal handlers."""
        if barrier_first:
            barrier()
        if getattr(self, "info", None) is None or self.info.owns_group:
            shutdown()
        if hasattr(self, "stop"):
            self.stop.restore()

    # --- the loop -----------------------------------------------------------------------------------

    def train(self) -> None:
        """Epochs of optimizer steps from the current position; raises StopRequested after a stop save."""
        cfg, pos = self.cfg, self.position
        self.window = Window(torch.zeros((), dtype=torch.float32, device=self.info.device))
        self.flops_per_token = model_flops_per_token(self.engine.module, cfg.max_seq_length)
        self.peak = peak_flops(cfg)
        # The loader's own generator: creating a loader must not draw from the global RNG (dropout), or a
        # resumed run would diverge from an uninterrupted one.
        self.loader_gen = torch.Generator().manual_seed(cfg.seed)
        started = time.perf_counter()
        while pos.epoch < cfg.num_epochs and not self.selection.stopped_early:
            self.train_epoch()
        self.train_seconds = time.perf_counter() - started

    def train_epoch(self) -> None:
        cfg, pos, info, task = self.cfg, self.position, self.info, self.task
        epoch = pos.epoch
        self.engine.train()
        batches = train_batches(task.n_train, epoch, cfg.seed, info.rank, info.world_size, self.batch.micro,
                                cfg.effective_batch_size, task.lengths)[pos.step_in_epoch * self.accum:]
        loader = make_loader(task.train_rows, batches, task.collate(epoch), loader_workers(cfg.num_workers, info.device),
                             info.device.type != "cpu", self.loader_gen)
        while pos.step_in_epoch < self.per_epoch:
            step_batches = [next(loader) for _ in range(self.accum)]  # one optimizer step's micro-batches
            # counted on the host, before the batches move: no device sync
            counts = [task.n_targets(b) for b in step_batches] if task.global_loss_norm else []
            # A signal that arrived during the last step (or its evaluation or save) takes effect now,
            # before this step: all ranks agree and save the step they all finished.
            agreed, total_targets = step_sync(self.stop, sum(counts), info)
            self.stop_if_agreed(agreed)
            self.train_step(step_batches, counts, total_targets)
            pos.step += 1
            pos.step_in_epoch += 1
            self.window.steps += 1
            self.log.advance(pos.step)
            progress = epoch + pos.step_in_epoch / self.per_epoch
            if pos.step % cfg.logging_steps == 0 or pos.step == self.total_steps:
                self.log_window(progress)
            if pos.step_in_epoch == self.per_epoch:
                break  # the epoch-end evaluation and checkpoint follow
            saved = False
            switch = self.warmup is not None and self.warmup.done_at(pos.step)  # the held-out loss of the head alone
            if ((cfg.eval_steps and pos.step % cfg.eval_steps == 0) or switch) and self.evaluate(progress) \
                    and self.selection.enabled:
                self.save()  # every candidate for the best step gets its checkpoint (with the selection state)
                saved = True
                if self.selection.stopped_early:
                    return self.report_early_stop()
            if cfg.save_steps and pos.step % cfg.save_steps == 0 and not saved:
                self.save()
        self.evaluate(float(epoch + 1))
        pos.epoch, pos.step_in_epoch = epoch + 1, 0
        self.save()
        if self.selection.stopped_early:
            return self.report_early_stop()
        if pos.epoch < cfg.num_epochs:
            # the epoch-end save is done: stop now rather than after another step
            self.stop_if_agreed(step_sync(self.stop, 0, info)[0])

    def train_step(self, step_batches: list[Batch], counts: list[int], total_targets: int) -> None:
        """Forward and backward of each micro-batch; DeepSpeed steps the optimizer after the last one.
        `counts`: each micro-batch's loss targets, `total_targets` the step's over all ranks (step_sync)."""
        task, info, engine, w = self.task, self.info, self.engine, self.window
        if self.warmup is not None:
            self.warmup.set_position(self.position.step)  # the position decides the phase: resume-exact
        norm = None
        if task.global_loss_norm:
            # Every target weighs the same, whichever rank or micro-batch it is in (DeepSpeed averages
            # over ranks and micro-steps).
            norm = max(total_targets, 1) / (info.world_size * self.accum)
        for i, batch in enumerate(step_batches):
            w.tokens += real_tokens(batch)  # counted on the host: no device sync
            w.samples += batch["input_ids"].shape[0]
            out = engine(**to_device(batch, info.device))
            if norm is not None:
                batch_sum = task.loss_sum(out, counts[i])
                engine.backward(batch_sum / norm)
            else:
                engine.backward(out.loss)
            self.optimizer_step_or_fail()
            if norm is not None:
                w.loss_sum += batch_sum.detach().float()
                w.loss_count += counts[i]
            else:
                w.loss_sum += out.loss.detach().float()
                w.loss_count += 1
            ckpt.inject("train", info.rank, self.position.step)  # tests: a signal or crash mid-accumulation

    def optimizer_step_or_fail(self) -> None:
        """engine.step(), with DeepSpeed's bare exception at the FP16 loss-scale floor turned into one line
        (users hit it as a traceback: DeepSpeedExamples#418, DeepSpeed#697). Nothing is saved: the last
        good checkpoint stays what `latest` names, and the job exits 3, not 75 (a requeue would fail again)."""
        try:
            self.engine.step()
        except Exception as exc:  # DeepSpeed raises a plain Exception here
            if "loss scale already at minimum" not in str(exc):
                raise
            latest = self.layout.checkpoints / ckpt.LATEST
            last_good = latest.read_text().strip() if latest.is_file() else "none"
            raise TrainingFailed(
                f"FP16 loss scale at its minimum ({float(self.engine.optimizer.cur_scale):g}) and the gradients still "
                f"overflow, at optimizer step {self.position.step + 1}: train in BF16 (e.g. --ds_config zero2_bf16) "
                f"or with a lower learning_rate (now {self.cfg.learning_rate:g}), or resume from an earlier "
                f"checkpoint (--resume {self.layout.checkpoints}/<tag>); last good checkpoint: {last_good}, "
                "nothing saved over it", on_every_rank=True) from None

    def log_window(self, progress: float) -> None:
        """One record of the steps since the last one: loss, lr, throughput, grad norm, loss scale."""
        w, engine, step = self.window, self.engine, self.position.step
        totals = all_reduce_sum(torch.tensor([float(w.loss_sum), w.loss_count, w.tokens, w.samples],
                                             dtype=torch.float64), self.info)
        elapsed = time.perf_counter() - w.started
        record = {"step": step, "epoch": round(progress, 4), "loss": float(totals[0] / totals[1]),
                  "lr": engine.get_lr()[0], "tokens_per_s": float(totals[2]) / elapsed,
                  "samples_per_s": float(totals[3]) / elapsed, "step_time_s": elapsed / max(1, w.steps),
                  "skipped_steps": int(engine.skipped_steps)}
        if self.peak:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak * self.info.world_size)
        if engine.fp16_enabled():  # dynamic loss scale: a collapse to 1 means training stalled
            record["loss_scale"] = float(engine.optimizer.cur_scale)
        grad_norm = grad_norm_of(engine)  # the last step's global norm, before clipping
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.log.write(record, f"step {step}/{self.total_steps} epoch {progress:.2f} loss {record['loss']:.4f} "
                               f"lr {record['lr']:.3e} tok/s {record['tokens_per_s']:.0f}"
                               + (f" mfu {record['mfu']:.1%}" if "mfu" in record else "")
                               + (f" loss_scale {record['loss_scale']:g}" if "loss_scale" in record else ""))
        w.reset()

    def evaluate(self, epoch: float) -> dict[str, Any] | None:
        """Held-out metrics at this step (all ranks), logged; None when the task has no held-out data."""
        self.engine.eval()
        start = time.perf_counter()
        metrics = self.task.evaluate(self.engine, self.info)
        self.engine.train()
        step = self.position.step
        switch = self.warmup is not None and self.warmup.done_at(step)
        if not metrics:
            if switch and self.info.is_main:
                print(f"[{self.task.arch}] head warm-up done after step {step} (no held-out data to evaluate); the "
                      "encoder and embeddings train from the next step", flush=True)
            return None
        record = {"step": step, "epoch": round(epoch, 4), **{f"eval_{k}": v for k, v in metrics.items()},
                  "eval_seconds": round(time.perf_counter() - start, 3),
                  **({"head_warmup_end": True} if switch else {})}
        self.state.history.append(record)
        if self.selection.enabled:
            previous = self.selection.best_step
            if self.selection.update(record):  # the new best: keep its checkpoint beyond keep_last
                if previous is not None:
                    self.ckpts.unpin(ckpt.tag_for(previous))
                self.ckpts.pin(ckpt.tag_for(step))
        self.log.write(record, f"eval @ step {step}: " + " ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if switch and self.info.is_main:
            loss = metrics.get("loss", float("nan"))
            print(f"[{self.task.arch}] head warm-up done after step {step}: held-out loss {loss:.4f} with the "
                  "head trained alone; the encoder and embeddings train from the next step", flush=True)
        return record

    def stop_if_agreed(self, signum: int) -> None:
        """With step_sync's agreed signal: all ranks save the same step (unless it is saved) and stop."""
        if signum:
            self.stop.signum = signum
            if self.saved_step != self.position.step:
                self.save()
            raise StopRequested(signum, self.position.step)

    def save(self) -> Path:
        extra = {**({"selection": self.selection.state_dict()} if self.selection.enabled else {}),
                 **({"head_warmup_steps": self.head_warmup} if self.head_warmup else {})} or None
        path = self.ckpts.save(self.engine, self.position, extra)
        self.saved_step = self.position.step
        return path

    def report_early_stop(self) -> None:
        sel = self.selection
        if self.info.is_main:
            print(f"[{self.task.arch}] early stop at step {self.position.step}: {sel.since_best} evaluations without "
                  f"improvement of held-out {sel.metric} (best {sel.best_value:.6g} at step {sel.best_step})",
                  flush=True)

    def write_meta(self, tag_dir: Path) -> None:
        save_hf_meta(tag_dir, self.engine.module.config, self.tokenizer, self.task.arch, self.task.export_settings())

    # --- the end ------------------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """Export the final checkpoint (or, with --select_best, the best one) and check the exported
        model's logits against the engine's."""
        final = self.layout.checkpoints / ckpt.tag_for(self.position.step)
        if not (final / ckpt.STATE_FILE).is_file():  # e.g. no steps left; normally the epoch-end save
            final = self.save()
        chosen, comparable = self.load_selected(final)
        # Probe logits from the engine (all ranks: ZeRO-3 gathers collectively).
        self.engine.eval()
        probe = {k: v for k, v in self.task.probe().items()  # the dense forward: full logits
                 if k not in ("labels", "masked_positions")}
        with torch.no_grad():
            before = self.engine(**to_device(probe, self.info.device)).logits.float().cpu()
        chosen_eval = [r for r in self.state.history if r["step"] == self.selection.best_step]
        summary: dict[str, Any] = {
            "stage": self.task.arch, "steps": self.position.step, "train_seconds": round(self.train_seconds, 2),
            "world_size": self.info.world_size, "precision": self.precision,
            "final_eval": self.state.history[-1] if self.state.history else {}, "final_checkpoint": str(final)}
        if self.selection.enabled:
            summary["selected"] = {"metric": self.selection.metric, "value": self.selection.best_value,
                                   "step": self.selection.best_step, "evaluations": self.selection.evaluations,
                                   "stopped_early": self.selection.stopped_early, "checkpoint": str(chosen),
                                   **({"eval": chosen_eval[-1]} if chosen_eval else {})}
        if self.info.is_main:
            model_dir, exported = export_checkpoint(str(chosen), self.layout.model, overwrite=True)
            summary.update({"model_dir": str(model_dir), "checkpoint": str(chosen)})
            if comparable:
                diff = float((logits_of(exported, probe) - before).abs().max())
                tolerance = 1e-4 if self.precision == "fp32" else 0.1 * max(1.0, float(before.abs().max()))
                if not math.isfinite(diff) or diff > tolerance:
                    raise RuntimeError(f"exported model disagrees with the trained one: max |logit diff| {diff:.3g} "
                                       f"> {tolerance:.3g}")
                summary["export_max_abs_logit_diff"] = diff
            dump_json(summary, self.layout.summary)
            print(f"[{self.task.arch}] exported {model_dir} from {chosen.name}"
                  + (f" (max |logit diff| vs trained model: {summary['export_max_abs_logit_diff']:.2e})"
                     if comparable else " (not compared: saved at another world size)"), flush=True)
            self.log.finish(summary)
        return summary

    def load_selected(self, final: Path) -> tuple[Path, bool]:
        """The checkpoint to export, and whether the engine now holds its weights (for the logit check).
        With --select_best the best checkpoint is loaded back into the engine (when it was saved at this
        world size)."""
        sel = self.selection
        if not sel.enabled or sel.best_step is None or sel.best_step == self.position.step:
            return final, True
        best = self.layout.checkpoints / ckpt.tag_for(sel.best_step)
        if ckpt.validate(best).world_size != self.info.world_size:
            return best, False
        self.ckpts.load(self.engine, best, same_world=True)
        return best, True
