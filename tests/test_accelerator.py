"""GPU-only branches, run in-process by faking what this machine lacks: which device a rank binds under
per-task GPU binding, which optimizer starts, threads per rank, the chunked kernel's masks on the
tensors' device, and the sparse MLM head without a device-to-host sync."""
from __future__ import annotations

import pytest
import torch

from dapt.config import MLMConfig
from dapt.distributed import bind_device, device_index
from dapt.errors import DaptError
from dapt.train import optim


class FakeAccelerator:
    """The slice of DeepSpeed's accelerator interface that device binding uses."""

    def __init__(self, visible: int):
        self.visible, self.selected = visible, None

    def device_count(self) -> int:
        return self.visible

    def set_device(self, index: int) -> None:
        assert 0 <= index < self.visible, f"invalid device ordinal {index} of {self.visible}"
        self.selected = index

    def device_name(self, index: int | None = None) -> str:
        return "cuda" if index is None else f"cuda:{index}"


@pytest.mark.parametrize("visible, local_world, expected", [
    (8, 8, list(range(8))),  # all 8 GPUs visible to every task: local rank i -> GPU i
    (1, 8, [0] * 8),  # --gpus-per-task=1 / --gpu-bind=single: each task sees its own GPU as cuda:0
    (2, 8, [0, 1] * 4),  # a GPU shared by several tasks: modulo
])
def test_device_follows_the_binding(visible, local_world, expected, capsys):
    got = []
    for local_rank in range(local_world):
        acc = FakeAccelerator(visible)
        device = bind_device(acc, local_rank, local_world)
        assert device == torch.device(f"cuda:{acc.selected}")
        got.append(acc.selected)
    assert got == expected
    assert ("share" in capsys.readouterr().out) == (1 < visible < local_world)


def test_no_visible_device_is_one_line():
    with pytest.raises(DaptError, match="no accelerator device is visible"):
        device_index(0, 0)


@pytest.mark.parametrize("requested, device, offload, prebuilt_fused, chosen", [
    ("auto", "cuda", False, False, "torch_adamw"),  # nothing to compile at start-up
    ("auto", "cuda", False, True, "fused_adam"),  # DeepSpeed's kernel is already built into the install
    ("auto", "cuda", True, False, "cpu_adam"),  # ZeRO-Offload steps on the host
    ("auto", "cpu", False, True, "torch_adamw"),
    ("fused_adam", "cuda", False, False, "fused_adam"),
    ("cpu_adam", "cpu", False, False, "cpu_adam"),
])
def test_optimizer_choice(monkeypatch, requested, device, offload, prebuilt_fused, chosen):
    monkeypatch.setattr(optim, "prebuilt", lambda op: prebuilt_fused and op == "fused_adam")
    assert optim.choose_optimizer(requested, device, offload) == chosen


def test_optimizer_choices_that_cannot_run_are_one_line():
    with pytest.raises(DaptError, match="offloads the optimizer .* use --optimizer cpu_adam"):
        optim.choose_optimizer("torch_adamw", "cuda", offload=True)
    with pytest.raises(DaptError, match="cpu_adam steps host tensors, but the parameters live on cuda"):
        optim.choose_optimizer("cpu_adam", "cuda", offload=False)


def test_auto_falls_back_to_torch_when_the_prebuilt_kernel_fails(monkeypatch, capsys):
    """A pre-built FusedAdam that still cannot load (a broken install, no CUDA here): auto starts anyway."""
    monkeypatch.setattr(optim, "prebuilt", lambda op: True)
    import deepspeed.ops.adam as ds_adam

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'fused_adam'\nninja: build stopped")

    monkeypatch.setattr(ds_adam, "FusedAdam", broken)
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = MLMConfig(output_dir="o")
    opt, name = optim.make_optimizer(cfg, [{"params": params, "weight_decay": 0.0}], "cuda", offload=False)
    assert name == "torch_adamw" and isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    assert "could not build its kernel (RuntimeError: Error building extension 'fused_adam')" in capsys.readouterr().out
    with pytest.raises(DaptError, match="optimizer fused_adam: DeepSpeed could not build its kernel"):
        optim.make_optimizer(MLMConfig(output_dir="o", optimizer="fused_adam"),
                             [{"params": params, "weight_decay": 0.0}], "cuda", offload=False)


def test_optimizers_are_adamw_with_the_recipe_values():
    cfg = MLMConfig(output_dir="o", learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                    weight_decay=0.05)
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = optim.build_optimizer("torch_adamw", [{"params": params}], cfg, "cpu")
    d = opt.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.05)
    assert not d.get("fused")  # fused only on CUDA


@pytest.mark.parametrize("launcher_env, local_world", [({"LOCAL_WORLD_SIZE": "2"}, 2), ({"LOCAL_SIZE": "4"}, 4)])
def test_threads_per_rank_on_every_accelerator(monkeypatch, launcher_env, local_world):
    """torchrun's LOCAL_WORLD_SIZE or the deepspeed launcher's LOCAL_SIZE split the node's cores."""
    import os

    from dapt import distributed

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    distributed._cpu_threads(local_world)
    assert set_to == [16 // local_world]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's (or srun's --cpus-per-task) value wins
    distributed._cpu_threads(local_world)
    assert set_to == [16 // local_world]


def test_chunked_kernel_makes_its_masks_on_the_tensors_device(monkeypatch):
    """On CUDA the dropout mask and its random bits must be made on the device, not on the host and
    copied: every allocation of the kernel follows q's device (meta tensors stand in for CUDA here)."""
    from dapt.model import attention

    devices = []
    real_randint, real_empty = torch.randint, torch.empty

    def randint(*args, **kwargs):
        devices.append(("randint", kwargs.get("device")))
        return real_randint(*args, **{**kwargs, "device": "cpu"})

    def empty(*args, **kwargs):
        devices.append(("empty", kwargs.get("device")))
        return real_empty(*args, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch, "empty", empty)
    q = torch.randn(1, 2, 4, 8)
    attention._ChunkedAttention.apply(q, q, q, None, 0.35, attention.drop_levels(0.1))
    assert devices and all(d == q.device for _, d in devices)
    assert attention._additive(torch.ones(1, 4, dtype=torch.bool), torch.float32).device == q.device


def test_sparse_head_positions_match_boolean_indexing(tiny_model, tokenizer_dir):
    """The collator's host-side target positions give the sparse head exactly what boolean indexing did."""
    from transformers import AutoTokenizer

    from dapt.data.mlm import MLMCollator
    from dapt.model.loading import load_mlm_model
    from dapt.model.surgery import use_sparse_head

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    collate = MLMCollator(special_ids=tuple(tok.all_special_ids), mask_id=tok.mask_token_id, vocab_size=len(tok),
                          probability=0.3, seed=1, epoch=0, pad_id=tok.pad_token_id, positions=True)
    ids = tok(["a great film with a plot", "dull and far too long for what it says"])["input_ids"]
    batch = collate({"input_ids": ids, "_index": [0, 1]})
    assert torch.equal(batch["masked_positions"], (batch["labels"].flatten() != -100).nonzero().flatten())
    model = use_sparse_head(load_mlm_model(str(tiny_model))).eval()
    with torch.no_grad():
        with_positions = model(**batch)
        without = model(**{k: v for k, v in batch.items() if k != "masked_positions"})
        dense = model(**{k: v for k, v in batch.items() if k not in ("labels", "masked_positions")})
    assert torch.equal(with_positions.loss_sum, without.loss_sum)
    chosen = batch["labels"] != -100
    assert torch.allclose(with_positions.logits, dense.logits[chosen], atol=1e-5)
