"""Attention for training on CPU with attention dropout.

BERT trains with dropout on its attention probabilities. PyTorch's SDPA has no fused CPU kernel with
dropout, so on CPU it falls back to its unfused path: scores, probabilities and a float dropout mask of
batch x heads x T x T each go through memory several times (at 512 tokens 42-47% of a MiniLM training
step; benchmarks/attention_dropout.py). `chunked_attention` computes the same attention one slice of heads
at a time, small enough to stay in cache, keeps the dropout mask as one byte per score, and recomputes the
probabilities in backward instead of storing them (the flash-attention idea at head granularity, in
PyTorch ops). It is only picked where it pays: `dapt_auto` runs it for float32 training with dropout on
CPU and hands everything else (evaluation, GPUs, half precision) to SDPA, whose CUDA kernels fuse dropout.

Dropout is drawn from the default generator in 16-bit steps: a score is dropped with probability
round(p * 65536) / 65536 (0.1000061 for p = 0.1) and kept ones are scaled by the inverse of the exact
keep probability, so the output stays unbiased. Same seed, same masks: runs and resumes reproduce.
"""
from __future__ import annotations

from typing import Any

import torch

_RANDOM_LEVELS = 1 << 16
_CACHE_SCORES = 1 << 18  # scores per slice: 1 MiB of float32, a core's L2 cache on current x86 servers


def drop_levels(p: float) -> int:
    """How many of the 65,536 equally likely 16-bit draws drop a score, for dropout probability p."""
    return round(p * _RANDOM_LEVELS)


def _draw_keep(out: torch.Tensor, dropped: int) -> torch.Tensor:
    """Fill the bool tensor `out`: True with probability 1 - dropped / 65536 (four 16-bit draws per
    64-bit random number, a quarter of the generator calls of bernoulli_)."""
    n = out.numel()
    # drawn on the mask's device (its generator): a CUDA mask is never made on the host and copied
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64,
                         device=out.device).view(torch.int16)[:n]
    return torch.ge(bits.view(out.shape), -(_RANDOM_LEVELS // 2) + dropped, out=out)


def _slices(batch: int, heads: int, q_len: int, k_len: int) -> list[tuple[int, int, int]]:
    """(batch index, first head, end head) slices of about _CACHE_SCORES scores each."""
    per = max(1, min(heads, _CACHE_SCORES // max(1, q_len * k_len)))
    return [(b, h, min(h + per, heads)) for b in range(batch) for h in range(0, heads, per)]


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                scale: float, dropped: int) -> torch.Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        keep_scale = _RANDOM_LEVELS / (_RANDOM_LEVELS - dropped)
        out = torch.empty_like(q)
        keep = torch.empty(batch, heads, q_len, k_len, dtype=torch.bool, device=q.device) if dropped else None
        for b, h0, h1 in _slices(batch, heads, q_len, k_len):
            probs = _probs(q[b, h0:h1], k[b, h0:h1], bias, b, h0, h1, scale)
            if keep is not None:
                probs.mul_(_draw_keep(keep[b, h0:h1], dropped))
            torch.bmm(probs, v[b, h0:h1], out=out[b, h0:h1])
        if keep is not None:
            out.mul_(keep_scale)
        ctx.save_for_backward(q, k, v, bias, keep)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, bias, keep = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for b, h0, h1 in _slices(q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
            probs = _probs(q[b, h0:h1], k[b, h0:h1], bias, b, h0, h1, ctx.scale)  # recomputed, in cache
            go = grad_out[b, h0:h1]
            dropped_probs = probs if keep is None else probs * keep[b, h0:h1]
            torch.bmm(dropped_probs.transpose(1, 2), go, out=dv[b, h0:h1])
            grad_probs = torch.bmm(go, v[b, h0:h1].transpose(1, 2))
            if keep is not None:
                grad_probs.mul_(keep[b, h0:h1])
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_scores.mul_(ctx.scale * ctx.keep_scale)
            torch.bmm(grad_scores, k[b, h0:h1], out=dq[b, h0:h1])
            torch.bmm(grad_scores.transpose(1, 2), q[b, h0:h1], out=dk[b, h0:h1])
        if keep is not None:
            dv.mul_(ctx.keep_scale)
        return dq, dk, dv, None, None, None


def _probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, b: int, h0: int, h1: int,
           scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + bias) for heads h0:h1 of batch row b."""
    if bias is None:
        scores = torch.bmm(q * scale, k.transpose(1, 2))
    else:
        rows = bias[b if bias.shape[0] > 1 else 0]
        scores = torch.baddbmm(rows[h0:h1] if rows.shape[0] > 1 else rows, q, k.transpose(1, 2), alpha=scale)
    return torch.softmax(scores, dim=-1)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """SDPA's mask convention (bool: True attends; float: added to the scores) as an additive 4-D bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.to(dtype)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                      dropout: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T + mask) with dropout, times v; q, k, v are [batch, heads, T, head size].

    `mask` follows SDPA: bool (True = attend) or float (added), broadcastable to [batch, heads, Tq, Tk].
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"attention dropout must be in [0, 1), got {dropout}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ChunkedAttention.apply(q, k, v, _additive(mask, q.dtype), scale, drop_levels(dropout))


def chunked_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The transformers attention interface around chunked_attention ([batch, T, heads, size] out)."""
    out = chunked_attention(query, key, value, attention_mask, dropout if module.training else 0.0, scaling)
    return out.transpose(1, 2).contiguous(), None


def auto_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """chunked_attention where it pays (float32 training with dropout on CPU), SDPA everywhere else."""
    if (module.training and drop_levels(dropout) > 0 and query.device.type == "cpu"
            and query.dtype == torch.float32 and torch.is_grad_enabled()):
        return chunked_attention_forward(module, query, key, value, attention_mask, dropout, scaling)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def hf_attn_implementation(name: str) -> str:
    """The transformers attn_implementation for dapt's setting (registering dapt's own functions)."""
    if name in ("sdpa", "eager"):
        return name
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    key = f"dapt_{name}"
    AttentionInterface.register(key, auto_attention_forward if name == "auto" else chunked_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(key, sdpa_mask)  # the masks SDPA takes
    return key
