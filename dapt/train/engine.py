"""The DeepSpeed engine: its JSON (engine settings from `ds_configs/`, training values filled in from
the recipe), parameter groups, precision and seeding.

The JSON owns ZeRO stage, precision, loss scaling, offload and bucket sizes. Batch sizes, optimizer,
schedule and clipping belong to the training config; a JSON that sets one of them to something else
is an error (a value equal to ours, or "auto", is accepted). Keys starting with "_" are comments.
"""
from __future__ import annotations

import json
import math
import random
from typing import Any, Sequence

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from dapt.config import TrainConfig, warmup_steps
from dapt.configs import find_ds_config
from dapt.errors import DaptError
from dapt.train.batch_plan import BatchPlan
from dapt.train.head_warmup import FROZEN_KEY

# Top-level keys that describe the engine and that DeepSpeed acts on by itself in dapt's loop.
ENGINE_KEYS = {
    "zero_optimization", "fp16", "bf16", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "flops_profiler",
    "comms_logger", "tensorboard", "csv_monitor", "aio", "checkpoint", "data_types", "timers",
}
# Keys DeepSpeed knows that would do nothing (or fight dapt) here: refused, each with where its job is done.
IGNORED_KEYS = {
    "activation_checkpointing": "DeepSpeed's checkpointing acts only on models that call deepspeed.checkpointing; "
                                "use --gradient_checkpointing (Hugging Face's, which BERT implements)",
    "compile": "dapt does not compile the model (torch.compile would not see dapt's attention kernel and "
               "model surgery); remove it",
    "wandb": "dapt logs to Weights & Biases itself: use --wandb_mode / --wandb_project",
    "amp": "precision comes from the fp16 / bf16 sections",
    "torch_autocast": "precision comes from the fp16 / bf16 sections",
    "elasticity": "the batch comes from the recipe's effective_batch_size, planned per world size",
    "dataloader_drop_last": "dapt's own loader decides the batches (dapt/data/batching.py)",
    "autotuning": "autotuning needs the `deepspeed --autotuning` driver and rewrites the batch; dapt plans it",
}
# Everything else DeepSpeed knows (pipeline, MoE, compression, curriculum, sparse attention, ...) needs
# model or loop code that dapt does not have.
UNUSED_KEYS = {
    "seq_parallel_communication_data_type", "sparse_gradients", "disable_allgather", "graph_harvesting",
    "use_data_before_expert_parallelism", "nebula", "compression_training", "data_efficiency",
    "curriculum_learning", "progressive_layer_drop", "eigenvalue", "pipeline", "hybrid_engine",
    "weight_quantization", "quantize_training", "sparse_attention", "mics_shard_size",
    "mics_hierarchical_params_gather",
}
# Keys dapt fills from the training config.
FILLED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "optimizer", "scheduler", "gradient_clipping",
}


def load_ds_config(path: str) -> dict[str, Any]:
    """Read and check the engine JSON (before any process group exists)."""
    p = find_ds_config(path)  # a file, or a packaged config by name (dapt/configs/ds/)
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DaptError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DaptError(f"DeepSpeed config {path} must be a JSON object")
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    for key in raw:
        if key in IGNORED_KEYS:
            raise DaptError(f"DeepSpeed config {path}: '{key}' would do nothing in dapt: {IGNORED_KEYS[key]}")
        if key in UNUSED_KEYS:
            raise DaptError(f"DeepSpeed config {path}: '{key}' needs model or training-loop support that dapt "
                            "does not have; remove it")
    unknown = sorted(set(raw) - ENGINE_KEYS - FILLED_KEYS)
    if unknown:
        raise DaptError(f"DeepSpeed config {path}: unknown key '{unknown[0]}'")
    _check_sections(raw, path)
    if zero_stage(raw) not in (1, 2, 3):
        # Checkpoints, export (zero_to_fp32) and world-size changes (universal checkpoints) all read
        # ZeRO's sharded layout; stage 0 writes another one.
        raise DaptError(f"DeepSpeed config {path}: zero_optimization.stage must be 1, 2 or 3 "
                        f"(got {zero_stage(raw)}); ZeRO-1 costs what plain data parallelism does")
    return raw


def _check_sections(raw: dict[str, Any], path: str) -> None:
    """Let DeepSpeed's own schema reject misspelled nested keys now, as one line."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    zero = raw.get("zero_optimization", {})
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise DaptError(f"DeepSpeed config {path}: zero_optimization.{where}: {err.get('msg')}") from None
    for section, allowed in (
        ("fp16", {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
                  "hysteresis", "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"}),
        ("bf16", {"enabled", "immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
                  "bf16_optimizer_states"}),
    ):
        extra = sorted(set(raw.get(section, {})) - allowed)
        if extra:
            raise DaptError(f"DeepSpeed config {path}: unknown key '{section}.{extra[0]}'")


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def resolve_precision(ds: dict[str, Any], path: str) -> str:
    """fp32, fp16 or bf16, from the JSON and what the detected accelerator supports.

    "auto" picks bf16 (else fp16) on an accelerator with native support and fp32 on CPU, where
    DeepSpeed emulates half precision slowly.
    """
    acc = get_accelerator()
    on_cpu = acc.device_name() == "cpu"
    fp16 = ds.get("fp16", {}).get("enabled", False)
    bf16 = ds.get("bf16", {}).get("enabled", False)
    if fp16 is True and bf16 is True:
        raise DaptError(f"DeepSpeed config {path} enables both fp16 and bf16; pick one")
    if bf16 is True or fp16 is True:
        want = "bf16" if bf16 is True else "fp16"
        supported = acc.is_bf16_supported() if want == "bf16" else acc.is_fp16_supported()
        if not supported:
            raise DaptError(
                f"DeepSpeed config {path} enables {want}, which the {acc.device_name()} accelerator "
                f"does not support; use a config with another precision or enabled: \"auto\""
            )
        return want
    if not on_cpu:
        if bf16 == "auto" and acc.is_bf16_supported():
            return "bf16"
        if fp16 == "auto" and acc.is_fp16_supported():
            return "fp16"
    return "fp32"


def build_ds_config(cfg: TrainConfig, ds: dict[str, Any], path: str, plan: BatchPlan,
                    steps_total: int) -> dict[str, Any]:
    """The engine JSON with batch (from the world size's `plan`), optimizer and schedule from `cfg`."""
    precision = resolve_precision(ds, path)
    filled: dict[str, Any] = {
        "train_batch_size": plan.effective,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accumulation,
        "gradient_clipping": cfg.max_grad_norm,
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": steps_total,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.learning_rate,
                # DeepSpeed needs >= 1; like HF's linear schedule, step 0 then runs at lr 0.
                "warmup_num_steps": max(1, min(warmup_steps(cfg, steps_total), steps_total)),
                "warmup_type": "linear",
            },
        },
    }
    if ds.get("optimizer", "auto") != "auto":
        raise DaptError(f"DeepSpeed config {path} sets 'optimizer'; the optimizer comes from the training config "
                        f"(--optimizer, learning_rate, adam_*, weight_decay): remove it from the JSON")
    for key, ours in filled.items():
        theirs = ds.get(key, "auto")
        if theirs == "auto":
            continue
        if key == "scheduler":
            raise DaptError(
                f"DeepSpeed config {path} sets 'scheduler'; the schedule comes from the training config "
                f"(learning_rate, warmup, num_epochs): remove it from the JSON"
            )
        if theirs != ours:
            raise DaptError(
                f"DeepSpeed config {path} sets {key}={theirs} but the training config gives {ours}; "
                f"remove it from the JSON (the training config is its source of truth)"
            )
    out = {k: v for k, v in ds.items() if k not in FILLED_KEYS}
    out.update(filled)
    out["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    out["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    out.setdefault("steps_per_print", 10**9)  # dapt logs itself
    return out


def param_groups(model: torch.nn.Module, weight_decay: float,
                 head: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (as BERT and HF Trainer do). With `head` (parameter
    names; --head_warmup_steps): the head's parameters in groups of their own, the rest in groups marked
    as frozen during the head warm-up (dapt/train/head_warmup.py); ZeRO flattens each group apart."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"))
        frozen = head is not None and name not in head
        groups.setdefault((frozen, decays), []).append(p)
    order = [(False, True), (False, False)] if head is None else \
        [(True, True), (True, False), (False, True), (False, False)]
    return [{"params": groups.get(key, []), "weight_decay": weight_decay if key[1] else 0.0,
             **({FROZEN_KEY: key[0]} if head is not None else {})}
            for key in order if head is None or groups.get(key)]


def precision_of(ds_cfg: dict[str, Any]) -> str:
    """The precision of a filled-in DeepSpeed config."""
    return "bf16" if ds_cfg["bf16"]["enabled"] else "fp16" if ds_cfg["fp16"]["enabled"] else "fp32"


def set_seed(seed: int) -> None:
    """Python, numpy, torch and the accelerator's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().manual_seed_all(seed)


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
