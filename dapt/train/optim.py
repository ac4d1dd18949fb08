"""The optimizer: AdamW, built by dapt and handed to DeepSpeed, so that it always starts.

DeepSpeed's own default on GPUs is its FusedAdam, JIT-compiled by every rank at start-up (nvcc and ninja on
the compute node, one build lock under ~/.cache/torch_extensions; a build killed by preemption leaves a
stale lock that hangs the next run: DeepSpeed #6540, #6912). torch's AdamW has a fused CUDA kernel of its
own and needs no build, so `auto` uses it, except where DeepSpeed's kernel is already compiled into the
install (DS_BUILD_FUSED_ADAM=1) or required (ZeRO-Offload runs the optimizer on the host: DeepSpeedCPUAdam).

    auto         torch_adamw; fused_adam when pre-built; cpu_adam when ZeRO offloads the optimizer
    torch_adamw  torch.optim.AdamW (fused on CUDA)
    fused_adam   deepspeed.ops.adam.FusedAdam (JIT-built on first use unless pre-built)
    cpu_adam     deepspeed.ops.adam.DeepSpeedCPUAdam (host tensors: ZeRO-Offload, or CPU ranks)

Every choice is AdamW (decoupled weight decay) with the training config's lr, betas, eps and decay.
"""
from __future__ import annotations

from typing import Any

import torch

from dapt.config import TrainConfig
from dapt.errors import DaptError


def prebuilt(op: str) -> bool:
    """Whether DeepSpeed's op was compiled into this install (no JIT build at start-up)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:  # pragma: no cover - every DeepSpeed release has it
        return False
    return bool(installed_ops.get(op, False))


def choose_optimizer(requested: str, device_type: str, offload: bool) -> str:
    """The concrete optimizer for `requested` on this device; a choice that cannot run here is one line."""
    if requested == "auto":
        if offload:
            return "cpu_adam"
        if device_type == "cuda" and prebuilt("fused_adam"):
            return "fused_adam"
        return "torch_adamw"
    if offload and requested != "cpu_adam":
        raise DaptError(f"optimizer {requested}: the DeepSpeed config offloads the optimizer to the CPU, which runs "
                        "DeepSpeed's CPU Adam; use --optimizer cpu_adam (or auto)")
    if requested == "cpu_adam" and device_type != "cpu" and not offload:
        raise DaptError(f"optimizer cpu_adam steps host tensors, but the parameters live on {device_type} without "
                        "ZeRO-Offload; use torch_adamw (or auto), or a DeepSpeed config with offload_optimizer")
    return requested


def build_optimizer(name: str, groups: list[dict[str, Any]], cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over `groups` (dapt.train.engine.param_groups) as the concrete optimizer `name`."""
    common = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon,
              "weight_decay": cfg.weight_decay}
    if name == "torch_adamw":
        # fused: one kernel for all tensors on CUDA (ZeRO hands it flat fp32 partitions on the device)
        return torch.optim.AdamW(groups, **common, **({"fused": True} if device_type == "cuda" else {}))
    try:
        if name == "fused_adam":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, **common, adam_w_mode=True)
        if name == "cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, **common, adamw_mode=True)
    except Exception as exc:  # noqa: BLE001 - a failed JIT build raises anything (RuntimeError, CalledProcessError...)
        raise DaptError(f"optimizer {name}: DeepSpeed could not build its kernel ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); use --optimizer torch_adamw (no build)") from None
    raise DaptError(f"unknown optimizer {name!r}")


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], device_type: str,
                   offload: bool) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer for this run and its name. `auto` falls back to torch's AdamW when DeepSpeed's
    pre-built kernel still fails to load (a broken install must not stop a job that needs no build)."""
    name = choose_optimizer(cfg.optimizer, device_type, offload)
    try:
        return build_optimizer(name, groups, cfg, device_type), name
    except DaptError as exc:
        if cfg.optimizer != "auto" or name != "fused_adam":
            raise
        print(f"dapt: {exc}; optimizer auto falls back to torch_adamw", flush=True)
        return build_optimizer("torch_adamw", groups, cfg, device_type), "torch_adamw"
