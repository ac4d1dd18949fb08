"""Model FLOPs per token and the accelerator's peak, for the MFU that training logs."""
from __future__ import annotations

import torch

from dapt.config import TrainConfig

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
