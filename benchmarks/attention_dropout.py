#!/usr/bin/env python
"""What BERT's attention dropout costs a training step on CPU (issue 15's profile).

One MiniLM fine-tune step (forward, backward, AdamW), batch 8, one thread, at 128 / 256 / 512 tokens per
row, four ways: attention dropout 0.1 as the recipe has it, on SDPA and on dapt's chunked kernel
(dapt/model/attention.py, what attn_implementation auto runs for CPU training); 0.0 on SDPA's flash
kernel; 0.0 forced onto SDPA's unfused math kernel. Dropout keeps SDPA off the flash kernel on CPU, so
(0.1 - flash) is what dropout costs, split into the unfused path (math - flash) and the mask itself
(0.1 - math); the chunked column says how much of it dapt's kernel wins back. Also prints
the matmul probe at 1 thread and on all cores and, with --profile, the top operators of one 512-token
step with dropout.

    .venv/bin/python benchmarks/attention_dropout.py [--profile] [--tokens 512] [--core]

--core times the attention alone instead, three ways (SDPA, dapt's chunked kernel, torch.compile).
"""
from __future__ import annotations

import argparse
import os
import time

from common import ROOT  # noqa: F401  (dapt from this checkout on sys.path)


def step_seconds(path: str, tokens: int, attn_dropout: float, math_kernel: bool, reps: int = 3,
                 profile: bool = False, attn: str = "sdpa") -> float:
    """Mean seconds of `reps` training steps after a warm-up (with `profile`: also print one step's
    operator table)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dapt.model.attention import hf_attn_implementation

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(path, attention_probs_dropout_prob=attn_dropout, num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config,
                                                               attn_implementation=hf_attn_implementation(attn))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, y = torch.randint(1000, 20000, (8, tokens)), torch.randint(0, 2, (8,))

    def step() -> None:
        model(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()

    kernels = [SDPBackend.MATH] if math_kernel else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(kernels):
        step()  # warm-up
        if profile:
            with torch.profiler.profile() as prof:
                step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        start = time.perf_counter()
        for _ in range(reps):
            step()
    return (time.perf_counter() - start) / max(reps, 1)


def attention_core(tokens: int = 512, reps: int = 3) -> None:
    """Attention alone (forward + backward, MiniLM's 12 heads of 32, batch 8, dropout 0.1, 1 thread):
    SDPA, dapt's chunked kernel, and torch.compile (inductor) of the textbook attention, whose compile
    time is printed apart."""
    import torch
    import torch.nn.functional as F

    from dapt.model.attention import chunked_attention

    torch.set_num_threads(1)
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 12, tokens, 32, requires_grad=True) for _ in range(3))

    def textbook(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(q @ k.transpose(2, 3) * 32 ** -0.5, dim=-1)
        return F.dropout(probs, p=0.1, training=True) @ v

    compiled = torch.compile(textbook, dynamic=False)
    start = time.perf_counter()
    compiled(q, k, v).sum().backward()
    compile_s = time.perf_counter() - start
    ways = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
            "dapt chunked": lambda: chunked_attention(q, k, v, dropout=0.1),
            "torch.compile": lambda: compiled(q, k, v)}
    for name, fn in ways.items():
        fn().sum().backward()  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            fn().sum().backward()
        print(f"attention alone, {tokens} tokens, {name}: {(time.perf_counter() - start) / reps:.3f} s"
              + (f" (compile {compile_s:.1f} s, first call)" if name == "torch.compile" else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--profile", action="store_true", help="top operators of one 512-token step with dropout")
    ap.add_argument("--core", action="store_true", help="only the attention alone, including torch.compile")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    from cpu_speed import matmul_flops

    from dapt.model.loading import resolve_model

    two, one = matmul_flops(), matmul_flops(threads=1)
    print(f"matmul probe: 1 thread {one / 1e9:.1f} GFLOP/s, {os.cpu_count()} threads {two / 1e9:.1f} GFLOP/s "
          f"({two / one:.2f}x)")
    if args.core:
        attention_core()
        return
    path = resolve_model("minilm-l6")
    if args.profile:
        step_seconds(path, 512, 0.1, False, reps=0, profile=True)
    print("tokens  dropout 0.1  0.0 flash  0.0 math   dropout's share  of it: unfused path  of it: the mask"
          "  0.1 chunked  chunked vs 0.1")
    for tokens in args.tokens:
        drop, flash, math = (step_seconds(path, tokens, p, m) for p, m in ((0.1, False), (0.0, False), (0.0, True)))
        chunked = step_seconds(path, tokens, 0.1, False, attn="chunked")
        print(f"{tokens:>6}  {drop:>9.2f} s  {flash:>7.2f} s  {math:>6.2f} s  {(drop - flash) / drop:>15.0%}  "
              f"{(math - flash) / drop:>19.0%}  {(drop - math) / drop:>15.0%}  {chunked:>9.2f} s  "
              f"{drop / chunked:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
