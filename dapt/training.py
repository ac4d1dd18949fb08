"""The one training loop both stages share, on the DeepSpeed engine.

A stage supplies a `Task` (its data, batches, evaluation and probe input); this module owns the
rest: output-dir safety, resume, the engine, accumulation, schedule, logging, checkpoints, stop
signals and export.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from dapt import checkpoint as ckpt
from dapt.config import TrainConfig, dump_json, to_dict, warmup_steps
from dapt.data import IndexedRows, make_loader, steps_per_epoch, train_batches
from dapt.distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, setup_distributed, shutdown
from dapt.ds_config import build_ds_config, load_ds_config, zero_stage
from dapt.errors import DaptError
from dapt.evaluation import to_device
from dapt.export import export_checkpoint, logits_of, save_hf_meta
from dapt.models import load_tokenizer, resolve_model
from dapt.tracking import fresh_start, grad_norm_of, start_tracking
from dapt.version import __version__

# What a dapt run directory holds; a directory with only these (and no complete checkpoint) is a run
# that died before its first checkpoint and may be started again.
RUN_FILES = {"run_config.json", "metrics.jsonl", "checkpoints", "wandb_run_id", "wandb"}


class Task(Protocol):
    """What a stage provides to the loop."""

    arch: str  # "mlm" or "classifier" (export)
    train_rows: IndexedRows
    n_train: int

    def collate(self, epoch: int) -> Callable[[dict[str, Any]], dict[str, torch.Tensor]]: ...

    def evaluate(self, engine: Any, info: DistInfo) -> dict[str, float]: ...

    def probe(self) -> dict[str, torch.Tensor]: ...

    def export_settings(self) -> dict[str, Any]: ...


@dataclass
class TrainState:
    position: ckpt.TrainPosition
    history: list[dict[str, Any]] = field(default_factory=list)


class StopRequested(Exception):
    """Raised after the stop checkpoint is saved; the entry point exits with EXIT_REQUEUE."""


class MetricsLog:
    """Rank 0 writes one JSON object per line to <output_dir>/metrics.jsonl and a line to stdout; the
    same record goes to W&B and the progress bar through `tracker` (dapt.tracking.Tracker)."""

    def __init__(self, path: Path | None, tracker: Any = None):
        self.path = path
        self.tracker = tracker

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps the interrupted run took after its last checkpoint."""
        if self.path is None or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any], line: str) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record, line)
        else:
            print(line, flush=True)

    def advance(self, step: int) -> None:
        if self.tracker is not None:
            self.tracker.advance(step)

    def finish(self, summary: dict[str, Any] | None = None, preempted: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.finish(summary, preempted)
            self.tracker = None


def guard_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds a previous run (or anything else), unless told to."""
    if not out.exists() or overwrite:
        return
    entries = {p.name for p in out.iterdir()}
    if entries and not entries <= RUN_FILES:
        raise DaptError(f"output_dir {out} is not empty (a previous run?); pass --overwrite_output_dir "
                        f"to replace it or choose another directory")


def check_length(cfg: TrainConfig, model_path: str) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise DaptError(f"cannot load model config '{model_path}': {str(exc).splitlines()[0]}") from None
    limit = getattr(config, "max_position_embeddings", None)
    if limit and cfg.max_seq_length > limit:
        raise DaptError(f"max_seq_length {cfg.max_seq_length} exceeds the model's limit of {limit} positions")
    return config


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (as BERT and HF Trainer do)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _finished(out: Path, resume_from: Path | None) -> dict[str, Any] | None:
    """The summary of a run whose export of its final checkpoint already completed."""
    summary_path = out / "summary.json"
    if resume_from is None or not summary_path.is_file() or not (out / "model").is_dir():
        return None
    summary = json.loads(summary_path.read_text())
    return summary if summary.get("checkpoint") == str(resume_from) else None


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        get_accelerator().manual_seed_all(seed)


def run_stage(cfg: TrainConfig, build_task: Callable[[TrainConfig, DistInfo, Any], Task],
              load_model: Callable[[str], torch.nn.Module]) -> dict[str, Any]:
    """Validate, train (or resume), checkpoint and export one stage. Returns the run summary."""
    import deepspeed

    # Everything that can be checked without data or a process group fails first, writing nothing.
    ds_raw = load_ds_config(cfg.ds_config)
    model_path = resolve_model(cfg.model_name_or_path)
    check_length(cfg, model_path)
    out = Path(cfg.output_dir)
    resume_from = None if cfg.overwrite_output_dir and cfg.resume == "auto" else ckpt.find_resume(out, cfg.resume)
    if resume_from is None:
        guard_output_dir(out, cfg.overwrite_output_dir)
    done = _finished(out, resume_from)
    if done is not None:
        print(f"{out}: this run already finished (model exported from {resume_from}); nothing to do", flush=True)
        return done

    info = setup_distributed()
    stop = ckpt.StopFlag()
    tokenizer = load_tokenizer(model_path)
    task = build_task(cfg, info, tokenizer)
    per_epoch = steps_per_epoch(task.n_train, cfg.effective_batch_size)
    total_steps = per_epoch * cfg.num_epochs
    ds_cfg = build_ds_config(cfg, ds_raw, cfg.ds_config, info.world_size, total_steps)
    accum = ds_cfg["gradient_accumulation_steps"]
    warmup = ds_cfg["scheduler"]["params"]["warmup_num_steps"]
    precision = "bf16" if ds_cfg["bf16"]["enabled"] else "fp16" if ds_cfg["fp16"]["enabled"] else "fp32"

    saved_world = ckpt.validate(resume_from).world_size if resume_from else info.world_size
    if resume_from is not None and saved_world != info.world_size:
        resume_from = ckpt.to_universal(resume_from, info)  # re-partition ZeRO state for the new world size
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}

    # The same seed on every rank: newly initialised weights (a new head) must be identical on all
    # ranks, and two runs of one config must be the same run.
    set_seed(cfg.seed)
    model = load_model(model_path)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, cfg.weight_decay),
                                           config=ds_cfg)
    log = MetricsLog(out / "metrics.jsonl" if info.is_main else None)
    state = TrainState(ckpt.TrainPosition(world_size=info.world_size, effective_batch_size=cfg.effective_batch_size,
                                          seed=cfg.seed))
    if resume_from is not None:
        pos = ckpt.load(engine, resume_from, info.rank, same_world=saved_world == info.world_size)
        if (pos.effective_batch_size, pos.seed) != (cfg.effective_batch_size, cfg.seed):
            raise DaptError(f"checkpoint {resume_from} was trained with effective_batch_size "
                            f"{pos.effective_batch_size} and seed {pos.seed}; this run has "
                            f"{cfg.effective_batch_size} and {cfg.seed}")
        state.position = ckpt.TrainPosition(**{**asdict(pos), "world_size": info.world_size})
        ds_cfg.get("checkpoint", {}).pop("load_universal", None)
    if info.is_main:
        if resume_from is None:
            for stale in (out / "checkpoints", out / "metrics.jsonl", out / "summary.json"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        log.truncate_after(state.position.step)
        dump_json({"dapt_version": __version__, "stage": task.arch, "config": to_dict(cfg),
                   "deepspeed": ds_cfg, "world_size": info.world_size, "device": str(info.device),
                   "precision": precision, "model": model_path}, out / "run_config.json")
        if warmup_steps(cfg, total_steps) > total_steps:
            print(f"warning: warmup of {warmup_steps(cfg, total_steps)} steps exceeds the {total_steps} steps of "
                  f"this run; the learning rate peaks at the last step", flush=True)
        print(f"[{task.arch}] {task.n_train} train examples, {per_epoch} steps/epoch x {cfg.num_epochs} epochs "
              f"= {total_steps} steps; batch {cfg.micro_batch_size} x {accum} accumulation x {info.world_size} "
              f"rank(s) = {cfg.effective_batch_size}; warmup {warmup} steps; "
              f"ZeRO-{zero_stage(ds_cfg)} {precision} on {info.device} ({info.backend})"
              + (f"; resumed from {resume_from} at step {state.position.step}" if resume_from else ""), flush=True)
        if resume_from is None:
            fresh_start(out)  # a new run gets a new W&B run; a resumed one continues its own
        log.tracker = start_tracking(cfg, out, task.export_settings().get("stage", task.arch),
                                     json.loads((out / "run_config.json").read_text()), resume_from is not None,
                                     total_steps, state.position.step)

    ckpt_root = out / "checkpoints"

    def write_meta(tag_dir: Path) -> None:
        save_hf_meta(tag_dir, engine.module.config, tokenizer, task.arch, task.export_settings())

    def save() -> Path:
        return ckpt.save(engine, ckpt_root, state.position, info.rank, info.is_main, write_meta, cfg.keep_last,
                         cfg.pin_checkpoints)

    started = time.perf_counter()
    try:
        train_loop(cfg, task, engine, info, state, log, accum, per_epoch, total_steps, save, stop)
    except StopRequested:
        if info.is_main:
            print(f"[{task.arch}] stopped by signal {stop.signum} at step {state.position.step}; checkpoint saved; "
                  f"exit {ckpt.EXIT_REQUEUE} (requeue me)", flush=True)
        log.finish(preempted=True)
        shutdown()
        sys.exit(ckpt.EXIT_REQUEUE)
    train_seconds = time.perf_counter() - started

    final = ckpt_root / ckpt.tag_for(state.position.step)
    if not (final / ckpt.STATE_FILE).is_file():  # e.g. num_epochs 0 steps left; normally the epoch-end save
        final = save()
    # Probe logits from the trained engine (all ranks: ZeRO-3 gathers collectively) for the export check.
    engine.eval()
    probe = {k: v for k, v in task.probe().items() if k != "labels"}  # the dense forward: full logits
    with torch.no_grad():
        before = engine(**to_device(probe, info.device)).logits.float().cpu()
    summary: dict[str, Any] = {"stage": task.arch, "steps": state.position.step,
                               "train_seconds": round(train_seconds, 2), "world_size": info.world_size,
                               "precision": precision, "final_eval": state.history[-1] if state.history else {}}
    if info.is_main:
        model_dir, exported = export_checkpoint(str(final), out / "model", overwrite=True)
        after = logits_of(exported, probe)
        diff = float((after - before).abs().max())
        tolerance = 1e-4 if precision == "fp32" else 0.1 * max(1.0, float(before.abs().max()))
        if not math.isfinite(diff) or diff > tolerance:
            raise RuntimeError(f"exported model disagrees with the trained one: max |logit diff| {diff:.3g} "
                               f"> {tolerance:.3g}")
        summary.update({"model_dir": str(model_dir), "checkpoint": str(final), "export_max_abs_logit_diff": diff})
        dump_json(summary, out / "summary.json")
        print(f"[{task.arch}] exported {model_dir} (max |logit diff| vs trained model: {diff:.2e})", flush=True)
        log.finish(summary)
    barrier()
    shutdown()
    return summary


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a host-side batch (packed MLM batches carry no mask: all are real)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def train_loop(cfg: TrainConfig, task: Task, engine: Any, info: DistInfo, state: TrainState, log: MetricsLog,
               accum: int, per_epoch: int, total_steps: int, save: Callable[[], Path], stop: ckpt.StopFlag) -> None:
    pos = state.position
    # Loss accumulates on the device; it is read (a host sync) only when logging.
    loss_sum = torch.zeros((), dtype=torch.float32, device=info.device)
    loss_count, token_count, sample_count = 0, 0, 0
    window_start = time.perf_counter()
    window_steps = 0
    pin = info.device.type != "cpu"
    flops_per_token, peak = model_flops_per_token(engine.module, cfg.max_seq_length), peak_flops(cfg)
    # The loader's own generator: creating a loader must not draw from the global RNG (dropout), or a
    # resumed run would diverge from an uninterrupted one.
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    while pos.epoch < cfg.num_epochs:
        epoch = pos.epoch
        engine.train()
        batches = train_batches(task.n_train, epoch, cfg.seed, info.rank, info.world_size, cfg.micro_batch_size,
                                cfg.effective_batch_size, getattr(task, "lengths", None))[pos.step_in_epoch * accum:]
        loader = make_loader(task.train_rows, batches, task.collate(epoch), cfg.num_workers, pin, loader_gen)
        while pos.step_in_epoch < per_epoch:
            step_batches = [next(loader) for _ in range(accum)]  # one optimizer step's micro-batches
            norm = None
            if getattr(task, "global_loss_norm", False):
                # All-reduced count of loss targets in this step: every masked token weighs the same,
                # whichever rank or micro-batch it is in (DeepSpeed averages over ranks and micro-steps).
                counts = [task.n_targets(b) for b in step_batches]  # on the host, once per micro-batch
                local = sum(counts)
                total = float(all_reduce_sum(torch.tensor([float(local)]), info)[0])
                norm = max(total, 1.0) / (info.world_size * accum)
            for i, batch in enumerate(step_batches):
                token_count += real_tokens(batch)  # counted on the host: no device sync
                sample_count += batch["input_ids"].shape[0]
                out = engine(**to_device(batch, info.device))
                if norm is not None:
                    # the dense head (sparse_mlm_head off) returns a mean: scale it back to a sum
                    targets = counts[i]
                    batch_sum = out.loss_sum if hasattr(out, "loss_sum") else out.loss * targets
                    loss = batch_sum / norm
                else:
                    loss = out.loss
                engine.backward(loss)
                engine.step()
                if norm is not None:
                    loss_sum += batch_sum.detach().float()
                    loss_count += targets
                else:
                    loss_sum += out.loss.detach().float()
                    loss_count += 1
                ckpt.inject("train", info.rank, pos.step)  # tests: a signal or crash mid-accumulation
            # A signal that arrived mid-accumulation took effect only now, at the optimizer step.
            pos.step += 1
            pos.step_in_epoch += 1
            window_steps += 1
            log.advance(pos.step)
            progress = epoch + pos.step_in_epoch / per_epoch
            if pos.step % cfg.logging_steps == 0 or pos.step == total_steps:
                window = torch.tensor([float(loss_sum), loss_count, token_count, sample_count], dtype=torch.float64)
                totals = all_reduce_sum(window, info)
                elapsed = time.perf_counter() - window_start
                record = {"step": pos.step, "epoch": round(progress, 4), "loss": float(totals[0] / totals[1]),
                          "lr": engine.get_lr()[0], "tokens_per_s": float(totals[2]) / elapsed,
                          "samples_per_s": float(totals[3]) / elapsed,
                          "step_time_s": elapsed / max(1, window_steps), "skipped_steps": int(engine.skipped_steps)}
                if peak:
                    record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * info.world_size)
                if engine.fp16_enabled():  # dynamic loss scale: a collapse to 1 means training stalled
                    record["loss_scale"] = float(engine.optimizer.cur_scale)
                grad_norm = grad_norm_of(engine)  # the last step's global norm, before clipping
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log.write(record, f"step {pos.step}/{total_steps} epoch {progress:.2f} "
                                  f"loss {record['loss']:.4f} lr {record['lr']:.3e} "
                                  f"tok/s {record['tokens_per_s']:.0f}"
                                  + (f" mfu {record['mfu']:.1%}" if "mfu" in record else "")
                                  + (f" loss_scale {record['loss_scale']:g}" if "loss_scale" in record else ""))
                loss_sum.zero_()
                loss_count, token_count, sample_count, window_steps = 0, 0, 0, 0
                window_start = time.perf_counter()
            if pos.step_in_epoch == per_epoch:
                break  # the epoch-end evaluation and checkpoint follow
            if cfg.eval_steps and pos.step % cfg.eval_steps == 0:
                run_eval(task, engine, info, state, log, progress)
            # All ranks agree on a stop request (any rank signalled) so that all save the same step.
            if stop_agreed(stop, info):
                save()
                raise StopRequested
            if cfg.save_steps and pos.step % cfg.save_steps == 0:
                save()
        run_eval(task, engine, info, state, log, float(epoch + 1))
        pos.epoch, pos.step_in_epoch = epoch + 1, 0
        save()
        if stop_agreed(stop, info) and pos.epoch < cfg.num_epochs:
            raise StopRequested


# Dense FP16/BF16 peak TFLOP/s per GPU (tensor cores), for MFU; override with --peak_tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
               "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
               "V100": 125.0, "RTX 4090": 165.0, "RTX A6000": 155.0, "T4": 65.0}


def peak_flops(cfg: TrainConfig) -> float:
    """Peak FLOP/s of one device: the config's, else the table's for a known GPU, else 0 (no MFU)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cuda":
        return 0.0
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12
    return 0.0


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """6N + 12*L*H*Q*T (N non-embedding parameters; nanoGPT / PaLM appendix B)."""
    cfg = model.config
    n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for name, p in model.named_parameters()
            if "embeddings" not in name and "decoder" not in name)
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    return 6 * n + 12 * layers * heads * (cfg.hidden_size // heads) * seq_len


def stop_agreed(stop: ckpt.StopFlag, info: DistInfo) -> bool:
    """True on every rank if any rank was signalled; `stop.signum` becomes the (largest) signal number."""
    agreed = int(all_reduce_max(torch.tensor([float(stop.signum or 0)]), info)[0])
    if agreed:
        stop.signum = agreed
    return bool(agreed)


def run_eval(task: Task, engine: Any, info: DistInfo, state: TrainState, log: MetricsLog, epoch: float) -> None:
    engine.eval()
    start = time.perf_counter()
    metrics = task.evaluate(engine, info)
    engine.train()
    if not metrics:
        return
    record = {"step": state.position.step, "epoch": round(epoch, 4),
              **{f"eval_{k}": v for k, v in metrics.items()}, "eval_seconds": round(time.perf_counter() - start, 3)}
    state.history.append(record)
    log.write(record, f"eval @ step {state.position.step}: " + " ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
