"""Typed run configuration: one source of truth per hyperparameter.

Precedence: dataclass defaults (the reference recipe) < a recipe file (`--config FILE`, YAML or JSON)
< command-line flags. A recipe file may hold one section per stage (`mlm:`, `finetune:`, `evaluate:`,
`export:`); its top-level keys apply to every stage that has such a field.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

import yaml

from dapt.configs import find_recipe
from dapt.errors import DaptError, first_line

STAGES = ("mlm", "finetune", "evaluate", "export")
TRUNCATIONS = ("head", "head+tail")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "chunked")  # see dapt/model/attention.py
OPTIMIZERS = ("auto", "torch_adamw", "fused_adam", "cpu_adam")  # see dapt/train/optim.py
ID2LABEL = {0: "negative", 1: "positive"}


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut to length."""

    # Local parquet/CSV/TSV/JSON(L) files (or folders of them), or an aclImdb folder tree or its .tar.gz
    # (split = dataset_split); empty means the hub dataset below.
    data_files: list[str] = field(default_factory=list)
    dataset_name: str = "stanfordnlp/imdb"
    dataset_split: str = "train"
    text_column: str = "text"
    # A column of example ids carried into per-example predictions when the input has it ("" = none).
    id_column: str = "id"
    max_seq_length: int = 512
    max_samples: int = 0  # 0 = all; otherwise a seeded random subset (quick runs, benchmarks)
    # A directory written by launch/prepare.py: the stage reads its tokenised splits (no loading, no
    # tokenising, no network) once its manifest matches this config. Replaces data_files/dataset_name.
    prepared_dir: str = ""
    # Empty or whitespace-only texts: "error", or "drop" them (the count is reported).
    empty_texts: str = "error"
    # Bytes that are not UTF-8: "error", or "replace" them with U+FFFD (the count is reported).
    encoding_errors: str = "error"
    # Extra label names, "name=id" (e.g. good=1); neg/negative = 0 and pos/positive = 1 are built in.
    label_map: list[str] = field(default_factory=list)
    num_proc: int = 1  # processes that tokenise (datasets.map); 1 = in the stage's own process


@dataclass
class TrainConfig(DataConfig):
    """Everything one training stage needs; the defaults are the reference recipe."""

    output_dir: str = ""
    model_name_or_path: str = "bert-base-uncased"
    # Engine settings (ZeRO stage, precision, loss scaling, offload); batch sizes, optimizer and
    # schedule are filled in from the fields below and must not be set there.
    ds_config: str = "zero2_fp16"
    seed: int = 42
    overwrite_output_dir: bool = False
    # Batch: the effective batch is fixed by the recipe; accumulation = effective / (micro * world).
    effective_batch_size: int = 64
    micro_batch_size: int = 16
    eval_batch_size: int = 64
    # AdamW with linear warmup then linear decay to zero. optimizer: auto (torch's AdamW, fused on GPUs:
    # nothing to compile; DeepSpeed's CPU Adam when ZeRO offloads the optimizer; DeepSpeed's FusedAdam only
    # when it was pre-built into the install), torch_adamw, fused_adam (DeepSpeed's, JIT-built on first
    # use) or cpu_adam (DeepSpeed's, for offload or CPU ranks). All are AdamW with the values below.
    optimizer: str = "auto"
    learning_rate: float = 2e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = no gradient clipping
    num_epochs: int = 3
    # >= 1: a number of optimizer steps; < 1: a fraction of all optimizer steps.
    warmup: float = 0.0
    # Held-out slice split off the training text for periodic evaluation (fraction of examples).
    validation_split: float = 0.02
    logging_steps: int = 50
    eval_steps: int = 0  # 0 = evaluate at the end of each epoch only
    # DataLoader workers per rank: -1 = auto (2 on accelerators, with pinned memory, so the next step's
    # micro-batches are collated while this one runs; 0 on CPU, where workers would take the ranks' cores).
    num_workers: int = -1
    # Recompute each encoder layer's activations in backward instead of storing them (Hugging Face's
    # gradient checkpointing): less memory for a longer step (~30% more compute).
    gradient_checkpointing: bool = False
    # Best-checkpoint selection on the held-out split (dapt/train/selection.py): none (export the last
    # step; the default, as the reference recipe), fine-tune: accuracy or f1_macro, MLM: loss. The best
    # checkpoint is pinned and exported. Early stopping after this many evaluations without improvement
    # (0 = off; needs select_best).
    select_best: str = "none"
    early_stopping_patience: int = 0
    # Checkpoints: every save_steps optimizer steps (0 = only at epoch ends and on a stop signal),
    # the newest keep_last kept plus pinned tags. resume: auto (latest complete checkpoint in
    # output_dir, if any), never (fresh start; an existing run needs --overwrite_output_dir), or a path.
    save_steps: int = 500
    keep_last: int = 2
    pin_checkpoints: list[str] = field(default_factory=list)
    resume: str = "auto"
    # Speed switches (each on by default; the benchmarks turn them off one at a time).
    # auto: SDPA (FlashAttention kernels on GPU), except float32 training with attention dropout on CPU,
    # which runs dapt's chunked kernel (dapt/model/attention.py); or sdpa, eager, chunked everywhere.
    attn_implementation: str = "auto"
    # Peak accelerator TFLOP/s for the logged MFU; 0 = from the table of known GPUs (none on CPU).
    peak_tflops: float = 0.0
    # Weights & Biases (rank 0 only; see dapt/tracking.py): auto (WANDB_MODE if set, else online when an
    # API key is configured, else disabled), online, offline (`wandb sync` later) or disabled. One
    # pipeline's jobs share a group: wandb_group, else $DAPT_WANDB_GROUP. Empty project: $WANDB_PROJECT or "dapt".
    wandb_mode: str = "auto"
    wandb_project: str = ""
    wandb_group: str = ""
    wandb_name: str = ""  # "" = <stage>-<output dir name>
    # Console progress on rank 0: auto (a tqdm bar in a terminal, plain lines with ETA otherwise, e.g.
    # Slurm logs), bar, or lines.
    progress: str = "auto"


@dataclass
class MLMConfig(TrainConfig):
    dataset_split: str = "unsupervised"
    warmup: float = 500
    mlm_probability: float = 0.15
    packing: bool = True  # full blocks of max_seq_length; off: one truncated review per row, padded per batch
    sparse_mlm_head: bool = True  # vocabulary projection only at masked positions
    # Loss = sum over masked tokens / all-reduced count of masked tokens in the optimizer step (all
    # ranks, all micro-batches); off: each micro-batch's own mean.
    global_loss_norm: bool = True
    # Whole-word masking: mlm_probability of the words are chosen and all their WordPiece pieces (a token
    # plus the `##` pieces after it) become targets together, so a word is never predicted from its own
    # visible pieces (BERT's WWM models); off: each piece is chosen on its own, as the reference recipe.
    whole_word_mask: bool = False


@dataclass
class FinetuneConfig(TrainConfig):
    label_column: str = "label"
    # head: keep the first tokens; head+tail: keep the first `head_tokens` and fill the rest of the
    # budget from the end of the review (Sun et al. 2019: 128 + 382 of 512).
    truncation: str = "head+tail"
    head_tokens: int = 128
    # Batches of similar length (sorted within large shuffled chunks; batch order stays random).
    length_bucketing: bool = True
    # The last encoder layer computed for [CLS] only (the pooler reads nothing else).
    cls_only_last_layer: bool = True


@dataclass
class EvalConfig(DataConfig):
    output_dir: str = ""
    model_name_or_path: str = ""
    dataset_split: str = "test"
    label_column: str = "label"
    eval_batch_size: int = 64
    max_seq_length: int = 0  # 0 = as the model was trained (stored in its config)
    truncation: str = ""  # "" = as the model was trained
    head_tokens: int = 0  # 0 = as the model was trained
    # auto: bf16 (or fp16) autocast on GPUs that support it, fp32 on CPU.
    precision: str = "auto"
    # Several test sets in one job: NAME=PATH entries (PATH: files or folders as for data_files); each is
    # scored and written to eval_results-<NAME>.json, with one combined eval_table.md. Empty: one set,
    # the data options above, named eval_name (default: from the data, e.g. imdb-test).
    eval_sets: list[str] = field(default_factory=list)
    eval_name: str = ""
    # predictions.jsonl (predictions-<NAME>.jsonl): every example once, in input order, with its row, id
    # (id_column), label, predicted label and class probabilities.
    save_predictions: bool = False
    cls_only_last_layer: bool = True  # as in fine-tuning: the last layer for [CLS] only
    overwrite_output_dir: bool = False
    # Weights & Biases for the results (as in TrainConfig; a run of job type "evaluate").
    wandb_mode: str = "auto"
    wandb_project: str = ""
    wandb_group: str = ""
    wandb_name: str = ""


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a checkpoint folder (…/checkpoints/<tag>) or a run's output dir (latest)
    output_dir: str = ""
    overwrite_output_dir: bool = False


C = TypeVar("C")


def _field_kind(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Convert a recipe or CLI value to the field's type, or fail naming the field."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(kind) is list:
            if isinstance(value, str):
                value = [value]
            return [str(v) for v in value]
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        tname = getattr(kind, "__name__", str(kind))
        raise DaptError(f"config field '{name}' expects {tname}, got {value!r}") from None


def _read_recipe(path: str, stage: str, cls: type) -> dict[str, Any]:
    p = find_recipe(path)  # a file, or a packaged recipe by name (dapt/configs/recipes/)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DaptError(f"config file {path} is not valid YAML/JSON: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise DaptError(f"config file {path} must hold a mapping of field names to values")
    known_anywhere = {f.name for c in STAGE_CONFIGS.values() for f in dataclasses.fields(c)}
    own = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in STAGES:
            continue
        if key not in known_anywhere:
            raise DaptError(f"config file {path}: unknown field '{key}'")
        if key in own:
            values[key] = value
    section = data.get(stage) or {}
    if not isinstance(section, dict):
        raise DaptError(f"config file {path}: section '{stage}' must be a mapping")
    for key, value in section.items():
        if key not in own:
            raise DaptError(f"config file {path}: unknown field '{key}' in section '{stage}'")
        values[key] = value
    return values


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one DaptError line instead of usage + message."""

    def error(self, message: str) -> typing.NoReturn:
        raise DaptError(f"{self.prog}: {message}")


def parse_config(cls: type[C], stage: str, argv: Sequence[str] | None = None) -> C:
    """Build a stage config from defaults, an optional recipe file and command-line flags."""
    parser = OneLineParser(prog=stage, allow_abbrev=False, description=cls.__doc__)
    parser.add_argument("--config", help="recipe file (YAML/JSON)")
    # The deepspeed launcher appends --local_rank=N; the rank itself is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        kind = _field_kind(cls, f)
        if typing.get_origin(kind) is list:
            parser.add_argument(f"--{f.name}", nargs="+", default=None)
        elif kind is bool:
            parser.add_argument(f"--{f.name}", nargs="?", const="true", default=None)
        else:
            parser.add_argument(f"--{f.name}", default=None)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(_read_recipe(args.config, stage, cls))
    for f in dataclasses.fields(cls):
        cli_value = getattr(args, f.name)
        if cli_value is not None:
            values[f.name] = cli_value
    kinds = {f.name: _field_kind(cls, f) for f in dataclasses.fields(cls)}
    cfg = cls(**{k: _coerce(k, kinds[k], v) for k, v in values.items()})
    validate(cfg)
    return cfg


STAGE_CONFIGS: dict[str, type] = {
    "mlm": MLMConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvalConfig,
    "export": ExportConfig,
}


def _range(cfg: Any, name: str, low: float, high: float | None = None, low_open: bool = False,
           high_open: bool = True, note: str = "") -> None:
    """One numeric field's range, as one line naming the field, the range and the value."""
    value = getattr(cfg, name)
    ok = (value > low if low_open else value >= low) and (
        high is None or (value < high if high_open else value <= high))
    if not ok:
        if high is None:
            want = f"> {low}" if low_open else f">= {low}"
        else:
            want = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise DaptError(f"{name} must be {want}{note}, got {value}")


def _validate_data(cfg: DataConfig) -> None:
    if isinstance(cfg, TrainConfig) or cfg.max_seq_length:  # evaluation: 0 = as the model was trained
        _range(cfg, "max_seq_length", 8, note=" (0 = as trained, evaluation only)" if not isinstance(
            cfg, TrainConfig) else "")
    _range(cfg, "max_samples", 0, note=" (0 = all)")
    _range(cfg, "num_proc", 1)
    if cfg.prepared_dir and cfg.data_files:
        raise DaptError("pass either --prepared_dir or --data_files, not both (a prepared directory holds its data)")
    if cfg.empty_texts not in ("error", "drop"):
        raise DaptError(f"empty_texts must be error or drop, got {cfg.empty_texts!r}")
    if cfg.encoding_errors not in ("error", "replace"):
        raise DaptError(f"encoding_errors must be error or replace, got {cfg.encoding_errors!r}")
    for entry in cfg.label_map:
        name, _, value = entry.partition("=")
        if not name.strip() or value.strip() not in {str(k) for k in ID2LABEL}:
            raise DaptError(f"label_map entries are name=id with id in {sorted(ID2LABEL)}, got {entry!r}")


def _validate_training(cfg: TrainConfig) -> None:
    for name in ("effective_batch_size", "micro_batch_size", "eval_batch_size", "num_epochs", "logging_steps",
                 "keep_last"):
        _range(cfg, name, 1)
    for name in ("eval_steps", "save_steps", "weight_decay", "peak_tflops"):
        _range(cfg, name, 0)
    _range(cfg, "num_workers", -1, note=" (-1 = auto)")
    if cfg.optimizer not in OPTIMIZERS:
        raise DaptError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    _range(cfg, "max_grad_norm", 0, note=" (0 = no clipping)")
    _range(cfg, "learning_rate", 0, low_open=True)
    _range(cfg, "adam_epsilon", 0, low_open=True)
    _range(cfg, "adam_beta1", 0, 1)
    _range(cfg, "adam_beta2", 0, 1)
    _range(cfg, "seed", 0, 2**32)  # numpy's seed range
    _range(cfg, "validation_split", 0, 1)
    if cfg.warmup < 0 or (1 <= cfg.warmup and not float(cfg.warmup).is_integer()):
        raise DaptError(f"warmup must be a step count (>= 1) or a fraction in [0, 1), got {cfg.warmup}")
    if not cfg.resume:
        raise DaptError("resume must be auto, never or a checkpoint path")
    if cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise DaptError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                        f"got {cfg.attn_implementation!r}")
    if cfg.progress not in ("auto", "bar", "lines"):
        raise DaptError(f"progress must be auto, bar or lines, got {cfg.progress!r}")
    if isinstance(cfg, MLMConfig):
        _range(cfg, "mlm_probability", 0, 1, low_open=True)
    metrics = ("none", "loss") if isinstance(cfg, MLMConfig) else ("none", "accuracy", "f1_macro")
    if cfg.select_best not in metrics:
        raise DaptError(f"select_best must be one of {', '.join(metrics)} for this stage, got {cfg.select_best!r}")
    _range(cfg, "early_stopping_patience", 0, note=" (0 = off)")
    if cfg.early_stopping_patience and cfg.select_best == "none":
        raise DaptError("early_stopping_patience needs a metric to watch: pass --select_best "
                        f"{metrics[1]}")
    if cfg.select_best != "none" and cfg.validation_split == 0:
        raise DaptError("select_best needs held-out data: validation_split must be > 0")


def _validate_truncation(cfg: FinetuneConfig | EvalConfig) -> None:
    if cfg.truncation and cfg.truncation not in TRUNCATIONS:
        raise DaptError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {cfg.truncation!r}")
    _range(cfg, "head_tokens", 0)
    budget = cfg.max_seq_length - 2
    if cfg.truncation == "head+tail" and cfg.max_seq_length and not 0 < cfg.head_tokens < budget:
        raise DaptError(f"head_tokens must be between 1 and max_seq_length - 3 = {budget - 1} for head+tail, "
                        f"got {cfg.head_tokens}")


def _validate_wandb(cfg: TrainConfig | EvalConfig) -> None:
    if cfg.wandb_mode not in ("auto", "online", "offline", "disabled"):
        raise DaptError(f"wandb_mode must be auto, online, offline or disabled, got {cfg.wandb_mode!r}")
    if cfg.wandb_mode in ("online", "offline") and importlib.util.find_spec("wandb") is None:
        raise DaptError(f"wandb_mode {cfg.wandb_mode} needs the wandb package: pip install 'dapt[wandb]'")


SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _validate_eval_sets(cfg: EvalConfig) -> None:
    names = []
    for entry in cfg.eval_sets:
        name, sep, path = entry.partition("=")
        if not sep or not SET_NAME.fullmatch(name) or not path:
            raise DaptError(f"eval_sets entries are NAME=PATH with NAME of letters, digits, '.', '_' or '-', "
                            f"got {entry!r}")
        names.append(name)
    if len(set(names)) != len(names):
        raise DaptError(f"eval_sets names must be unique, got {', '.join(names)}")
    if cfg.eval_sets and (cfg.data_files or cfg.prepared_dir):
        raise DaptError("pass either --eval_sets or --data_files/--prepared_dir (each set names its own files)")
    if cfg.eval_name and not SET_NAME.fullmatch(cfg.eval_name):
        raise DaptError(f"eval_name must be letters, digits, '.', '_' or '-', got {cfg.eval_name!r}")


def validate(cfg: Any) -> None:
    """Checks that need no data, model or network: fail before anything is written."""
    if not getattr(cfg, "output_dir", "x"):
        raise DaptError("--output_dir is required")
    if isinstance(cfg, DataConfig):
        _validate_data(cfg)
    if isinstance(cfg, TrainConfig):
        _validate_training(cfg)
    if isinstance(cfg, (FinetuneConfig, EvalConfig)):
        _validate_truncation(cfg)
    if isinstance(cfg, EvalConfig):
        if not cfg.model_name_or_path:
            raise DaptError("--model_name_or_path is required (an exported model folder)")
        _range(cfg, "eval_batch_size", 1)
        _validate_eval_sets(cfg)
        if cfg.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise DaptError(f"precision must be auto, fp32, fp16 or bf16, got {cfg.precision!r}")
    if isinstance(cfg, (TrainConfig, EvalConfig)):
        _validate_wandb(cfg)
    if isinstance(cfg, ExportConfig) and not cfg.checkpoint:
        raise DaptError("--checkpoint is required")


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """The warmup field read as steps (>= 1) or as a fraction of all steps (< 1)."""
    if cfg.warmup >= 1:
        return int(cfg.warmup)
    return int(round(cfg.warmup * total_steps))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
