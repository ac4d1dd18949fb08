"""Typed run configuration: one source of truth per hyperparameter.

Precedence: dataclass defaults (the reference recipe) < a recipe file (`--config FILE`, YAML or JSON)
< command-line flags. A recipe file may hold one section per stage (`mlm:`, `finetune:`, `evaluate:`,
`export:`); its top-level keys apply to every stage that has such a field.

Each field is declared with `flag(default, help, choices)`: its meaning and allowed values sit there and
nowhere else, and `--help` shows them with the default (as HfArgumentParser's `metadata={"help": ...}`).
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

from dapt.configs import DS, RECIPE, find_recipe, names
from dapt.errors import DaptError, first_line

STAGES = ("mlm", "finetune", "evaluate", "export")
TRUNCATIONS = ("head", "head+tail")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "chunked")  # see dapt/model/attention.py
OPTIMIZERS = ("auto", "torch_adamw", "fused_adam", "cpu_adam")  # see dapt/train/optim.py
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PROGRESS = ("auto", "bar", "lines")
ID2LABEL = {0: "negative", 1: "positive"}


def flag(default: Any, help: str, choices: Sequence[str] = ()) -> Any:
    """A config field with its meaning and, for a closed set, its allowed values: what `--help` shows
    (HfArgumentParser's `field(metadata={"help": ...})`), written once, where the field is declared."""
    metadata = {"help": help, "choices": tuple(choices)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_like(cls: type, name: str, default: Any = dataclasses.MISSING, choices: Sequence[str] | None = None) -> Any:
    """`cls`'s field `name` again, same meaning, for a stage that changes its default or allowed values."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if default is dataclasses.MISSING:
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return flag(default, f.metadata["help"], f.metadata["choices"] if choices is None else choices)


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut to length."""

    data_files: list[str] = flag([], "local parquet/CSV/TSV/JSON(L) files (or folders of them), or an aclImdb "
                                     "folder tree or its .tar.gz (split: --dataset_split); none: --dataset_name")
    dataset_name: str = flag("stanfordnlp/imdb", "Hugging Face hub dataset, read when neither --data_files nor "
                                                 "--prepared_dir is given")
    dataset_split: str = flag("train", "the split to read (of the hub dataset or the aclImdb tree)")
    text_column: str = flag("text", "the column holding the text")
    id_column: str = flag("id", 'a column of example ids carried into per-example predictions when the input has '
                                'it ("" = none)')
    max_seq_length: int = flag(512, "tokens per sequence, [CLS] and [SEP] included")
    max_samples: int = flag(0, "0 = all; otherwise a seeded random subset (quick runs, benchmarks)")
    prepared_dir: str = flag("", "a directory written by `dapt prepare`: the stage reads its tokenised splits (no "
                                 "loading, no tokenising, no network) once its manifest matches this config; "
                                 "replaces --data_files/--dataset_name")
    empty_texts: str = flag("error", "empty or whitespace-only texts: error, or drop them (the count is reported)",
                            choices=("error", "drop"))
    encoding_errors: str = flag("error", "bytes that are not UTF-8: error, or replace them with U+FFFD (the count "
                                         "is reported)", choices=("error", "replace"))
    label_map: list[str] = flag([], "extra label names, name=id (e.g. good=1, neutral=2); neg/negative = 0 and "
                                    "pos/positive = 1 are built in")
    num_proc: int = flag(1, "processes that tokenise (datasets.map); 1 = in the stage's own process")


@dataclass
class TrainConfig(DataConfig):
    """Everything one training stage needs; the defaults are the reference recipe."""

    output_dir: str = flag("", "the run's directory: checkpoints, metrics.jsonl, run_config.json and the exported "
                               "model/ (required)")
    model_name_or_path: str = flag("bert-base-uncased", "the model to start from: a hub name or a local folder")
    ds_config: str = flag("zero2_fp16",
                          f"DeepSpeed JSON, a path or a packaged name ({', '.join(names(DS))}), with "
                          "the engine settings (ZeRO stage, precision, loss scaling, offload); batch sizes, optimizer "
                          "and schedule are filled in from the flags here and must not be set there")
    seed: int = flag(42, "seed of every random choice: model head, held-out split, data order, masking, dropout")
    overwrite_output_dir: bool = flag(False, "write into an output dir that holds something else (with --resume "
                                             "auto: start afresh even if it holds a run's checkpoints)")
    effective_batch_size: int = flag(64, "examples per optimizer step over all ranks, fixed by the recipe; "
                                         "accumulation = effective / (micro x world size)")
    micro_batch_size: int = flag(16, "examples per rank per forward pass: a memory budget (shrunk where micro x "
                                     "world size exceeds the effective batch)")
    eval_batch_size: int = flag(64, "examples per rank per evaluation batch")
    optimizer: str = flag("auto", "AdamW, all with the --adam_* values: auto (torch's AdamW, fused on GPUs: nothing "
                                  "to compile; DeepSpeed's CPU Adam when ZeRO offloads the optimizer; DeepSpeed's "
                                  "FusedAdam only when it was pre-built into the install), torch_adamw, fused_adam "
                                  "(DeepSpeed's, JIT-built on first use) or cpu_adam (DeepSpeed's, for offload or "
                                  "CPU ranks)", choices=OPTIMIZERS)
    learning_rate: float = flag(2e-5, "peak learning rate: linear warmup to it, then linear decay to zero")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.999, "AdamW beta2")
    adam_epsilon: float = flag(1e-8, "AdamW epsilon")
    weight_decay: float = flag(0.01, "AdamW (decoupled) weight decay")
    max_grad_norm: float = flag(1.0, "clip gradients to this global norm; 0 = no gradient clipping")
    num_epochs: int = flag(3, "passes over the training data")
    warmup: float = flag(0.0, "linear warmup: >= 1 a number of optimizer steps; < 1 a fraction of all optimizer "
                              "steps")
    validation_split: float = flag(0.02, "held-out slice split off the training text for periodic evaluation "
                                         "(fraction of examples)")
    logging_steps: int = flag(50, "log loss, learning rate and throughput every this many optimizer steps")
    eval_steps: int = flag(0, "evaluate on the held-out slice every this many optimizer steps; 0 = at the end of "
                              "each epoch only")
    num_workers: int = flag(-1, "DataLoader workers per rank: -1 = auto (2 on accelerators, with pinned memory, so "
                                "the next step's micro-batches are collated while this one runs; 0 on CPU, where "
                                "workers would take the ranks' cores)")
    gradient_checkpointing: bool = flag(False, "recompute each encoder layer's activations in backward instead of "
                                               "storing them (Hugging Face's gradient checkpointing): less memory "
                                               "for a longer step (~30% more compute)")
    select_best: str = flag("none", "best-checkpoint selection on the held-out split (dapt/train/selection.py): "
                                    "none exports the last step (as the reference recipe); a metric (fine-tune: "
                                    "accuracy or f1_macro, MLM: loss) pins and exports the best checkpoint",
                            choices=("none", "loss", "accuracy", "f1_macro"))
    early_stopping_patience: int = flag(0, "stop after this many evaluations without improvement (0 = off; needs "
                                           "--select_best)")
    save_steps: int = flag(500, "checkpoint every this many optimizer steps (0 = only at epoch ends and on a stop "
                                "signal)")
    keep_last: int = flag(2, "checkpoints kept: the newest keep_last, plus pinned tags")
    pin_checkpoints: list[str] = flag([], "checkpoint tags (e.g. step0000500) kept whatever --keep_last says")
    resume: str = flag("auto", "auto (the latest complete checkpoint in output_dir, if any), never (fresh start; "
                               "an existing run needs --overwrite_output_dir), or a checkpoint path")
    attn_implementation: str = flag("auto", "speed switch: auto (SDPA, FlashAttention kernels on GPU, except float32 "
                                            "training with attention dropout on CPU, which runs dapt's chunked "
                                            "kernel, dapt/model/attention.py), or sdpa, eager, chunked everywhere",
                                    choices=ATTN_IMPLEMENTATIONS)
    peak_tflops: float = flag(0.0, "peak accelerator TFLOP/s for the logged MFU; 0 = from the table of known GPUs "
                                   "(none on CPU)")
    wandb_mode: str = flag("auto", "Weights & Biases, rank 0 only (dapt/observe/tracking.py): auto (WANDB_MODE if "
                                   "set, else online when an API key is configured, else disabled), online, offline "
                                   "(`wandb sync` later) or disabled", choices=WANDB_MODES)
    wandb_project: str = flag("", 'W&B project; "" = $WANDB_PROJECT, else dapt')
    wandb_group: str = flag("", 'W&B group that one pipeline\'s jobs share; "" = $DAPT_WANDB_GROUP')
    wandb_name: str = flag("", 'W&B run name; "" = <stage>-<output dir name>')
    progress: str = flag("auto", "console progress on rank 0: auto (a tqdm bar in a terminal, plain lines with ETA "
                                 "otherwise, e.g. Slurm logs), bar, or lines", choices=PROGRESS)


@dataclass
class MLMConfig(TrainConfig):
    """Stage 1: masked-language-model pretraining on the domain's text (domain-adaptive pretraining)."""

    dataset_split: str = flag_like(DataConfig, "dataset_split", "unsupervised")
    warmup: float = flag_like(TrainConfig, "warmup", 500)
    select_best: str = flag_like(TrainConfig, "select_best", choices=("none", "loss"))
    mlm_probability: float = flag(0.15, "the fraction of tokens (of words, with --whole_word_mask) chosen as "
                                        "prediction targets")
    packing: bool = flag(True, "speed switch: full blocks of max_seq_length tokens; false: one truncated text per "
                               "row, padded per batch")
    sparse_mlm_head: bool = flag(True, "speed switch: the vocabulary projection only at masked positions")
    global_loss_norm: bool = flag(True, "loss = sum over masked tokens / all-reduced count of masked tokens in the "
                                        "optimizer step (all ranks, all micro-batches); false: each micro-batch's "
                                        "own mean")
    whole_word_mask: bool = flag(False, "whole-word masking: --mlm_probability of the words are chosen and all "
                                        "their WordPiece pieces (a token plus the ## pieces after it) become targets "
                                        "together, so a word is never predicted from its own visible pieces (BERT's "
                                        "WWM models); false: each piece is chosen on its own, as the reference "
                                        "recipe")
    head_warmup_steps: float = flag(0, "for a checkpoint published without its MLM head (a sentence encoder, a "
                                       "distilled encoder: the load says which head tensors are new): the first "
                                       "optimizer steps train only the head's own weights (transform dense, "
                                       "LayerNorm, output bias) with the encoder and the word embeddings (the tied "
                                       "decoder) frozen, then everything; >= 1 a number of optimizer steps, in (0, 1) "
                                       "a fraction of all steps, 0 = off. The steps are part of the one learning-rate "
                                       "schedule (--warmup counts them too); the held-out loss is logged at the "
                                       "switch")


@dataclass
class FinetuneConfig(TrainConfig):
    """Stage 2: fine-tuning a sequence classifier, usually from the MLM stage's export."""

    select_best: str = flag_like(TrainConfig, "select_best", choices=("none", "accuracy", "f1_macro"))
    label_column: str = flag("label", "the column holding the label: a class id (0..K-1) or a name (--label_names, "
                                      "--label_map; neg/negative, pos/positive)")
    num_labels: int = flag(0, "classes; 0 = inferred from the training labels (the ids 0..K-1 that all occur, or the "
                              "distinct names; at least 2) and printed with their counts")
    label_names: list[str] = flag([], "class names in id order (e.g. World Sports Business Sci/Tech): the model's "
                                      "id2label, what predictions, cards and the demo show; the data may use these "
                                      "names or their ids; none: from the data (negative positive for two classes)")
    truncation: str = flag("head+tail", "head: keep the first tokens; head+tail: keep the first --head_tokens and "
                                        "fill the rest of the budget from the end of the text (Sun et al. 2019: "
                                        "128 + 382 of 512)", choices=TRUNCATIONS)
    head_tokens: int = flag(128, "tokens kept from the start with --truncation head+tail")
    length_bucketing: bool = flag(True, "speed switch: batches of similar length (sorted within large shuffled "
                                        "chunks; batch order stays random)")
    cls_only_last_layer: bool = flag(True, "speed switch: the last encoder layer computed for [CLS] only (the "
                                           "pooler reads nothing else)")


@dataclass
class EvalConfig(DataConfig):
    """Exact distributed evaluation of an exported classifier on one or more test sets."""

    output_dir: str = flag("", "where the results go: eval_results.json, predictions (required)")
    model_name_or_path: str = flag("", "an exported model folder (required)")
    dataset_split: str = flag_like(DataConfig, "dataset_split", "test")
    label_column: str = flag_like(FinetuneConfig, "label_column")
    num_labels: int = flag(0, "classes; 0 = as the model was trained (its id2label)")
    label_names: list[str] = flag([], "class names in id order; none = as the model was trained (its id2label); "
                                      "given, they must be the model's")
    eval_batch_size: int = flag_like(TrainConfig, "eval_batch_size")
    max_seq_length: int = flag(0, "tokens per sequence; 0 = as the model was trained (stored in its config)")
    truncation: str = flag("", 'as for fine-tuning; "" = as the model was trained', choices=TRUNCATIONS)
    head_tokens: int = flag(0, "as for fine-tuning; 0 = as the model was trained")
    precision: str = flag("auto", "auto: bf16 (or fp16) autocast on GPUs that support it, fp32 on CPU",
                          choices=PRECISIONS)
    eval_sets: list[str] = flag([], "several test sets in one job: NAME=PATH entries (PATH: files or folders as for "
                                    "--data_files); each is scored and written to eval_results-<NAME>.json, with one "
                                    "combined eval_table.md; none: one set, the data flags above, named --eval_name")
    eval_name: str = flag("", 'the test set\'s name; "" = from the data, e.g. imdb-test')
    save_predictions: bool = flag(False, "write predictions.jsonl (predictions-<NAME>.jsonl): every example once, "
                                         "in input order, with its row, id (--id_column), label, predicted label "
                                         "and class probabilities")
    cls_only_last_layer: bool = flag_like(FinetuneConfig, "cls_only_last_layer")
    overwrite_output_dir: bool = flag(False, "replace results already in output_dir")
    wandb_mode: str = flag_like(TrainConfig, "wandb_mode")
    wandb_project: str = flag_like(TrainConfig, "wandb_project")
    wandb_group: str = flag_like(TrainConfig, "wandb_group")
    wandb_name: str = flag_like(TrainConfig, "wandb_name")


@dataclass
class ExportConfig:
    """A checkpoint -> a Hugging Face model folder."""

    checkpoint: str = flag("", "a checkpoint folder (.../checkpoints/<tag>) or a run's output dir (its latest) "
                               "(required)")
    output_dir: str = flag("", "the model folder to write (required)")
    overwrite_output_dir: bool = flag(False, "replace an existing model folder")


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
        raise DaptError(f"{self.prog}: {message}{other_stages_note(message)}")


def other_stages_note(message: str) -> str:
    """For an unrecognised flag that another stage has (e.g. mlm's --head_warmup_steps given to finetune):
    which stage it belongs to."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    notes = []
    for token in message.split(":", 1)[1].split():
        name = token.split("=", 1)[0].removeprefix("--")
        owners = [stage for stage, cls in STAGE_CONFIGS.items() if token.startswith("--")
                  and name in {f.name for f in dataclasses.fields(cls)}]
        if owners:
            notes.append(f"--{name} is an option of {' and '.join(owners)} only")
    return f" ({'; '.join(notes)})" if notes else ""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """For the commands' own parsers: each flag's help followed by its default, as argparse's
    ArgumentDefaultsHelpFormatter, but silent where there is none to show (None, an unset switch) or the
    help already says it; the description (a module docstring) as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _show(value: Any) -> str:
    """A config value as --help shows it (and as the flag takes it)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(value) if value else "none"
    return '""' if value == "" else str(value)


def _field_help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if not text.endswith("(required)"):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = f"{text} (default: {_show(default)})"
    return text.replace("%", "%%")


def _group_title(cls: type, f: dataclasses.Field, stage: str) -> str:
    """Flags grouped by the config class that declares them: data, training, then the stage's own."""
    owner = next(c for c in reversed(cls.__mro__) if f.name in vars(c).get("__annotations__", {}))
    return {DataConfig: "data", TrainConfig: "training"}.get(owner, stage) + " options"


_METAVARS = {int: "INT", float: "FLOAT"}


def add_flag(group: argparse._ActionsContainer, cls: type, f: dataclasses.Field, **kwargs: Any) -> None:
    """`--<field>` with the field's help, default and allowed values. Its argparse default is None (not
    given), so that a recipe's value survives; the field's own default is what --help shows."""
    kind = _field_kind(cls, f)
    choices = f.metadata["choices"]
    metavar = "{" + ",".join(choices) + "}" if choices else _METAVARS.get(kind, "STR")
    if typing.get_origin(kind) is list:
        kwargs.update(nargs="+")
    elif kind is bool:
        kwargs.update(nargs="?", const="true")
        metavar = "{true,false}"
    group.add_argument(f"--{f.name}", default=None, metavar=metavar, help=_field_help(f), **kwargs)


def build_parser(cls: type, stage: str, parents: Sequence[argparse.ArgumentParser] = (),
                 usage: str | None = None) -> OneLineParser:
    """The stage's flags, one per config field: its meaning, default and allowed values come from the field."""
    parser = OneLineParser(prog=stage, allow_abbrev=False, description=cls.__doc__, parents=list(parents),
                           usage=usage or "%(prog)s [-h] [--config RECIPE] [--FIELD VALUE ...]",
                           epilog="Precedence: the defaults shown < the --config recipe < flags. A switch alone "
                                  "turns it on (--FIELD), --FIELD false turns it off.")
    parser.add_argument("--config", metavar="RECIPE",
                        help=f"the recipe, a YAML/JSON path or a packaged name ({', '.join(names(RECIPE))}): values "
                             "for the fields below, top-level or in a section per stage (mlm:, finetune:, evaluate:, "
                             "export:)")
    # The deepspeed launcher appends --local_rank=N; the rank itself is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        title = _group_title(cls, f, stage)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        add_flag(groups[title], cls, f)
    return parser


def parse_config(cls: type[C], stage: str, argv: Sequence[str] | None = None,
                 parents: Sequence[argparse.ArgumentParser] = (), usage: str | None = None) -> C:
    """Build a stage config from defaults, an optional recipe file and command-line flags (`parents`: a
    command's own flags, parsed and listed in --help beside the config's)."""
    args = build_parser(cls, stage, parents, usage).parse_args(argv)
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


def _allowed(cfg: Any, name: str) -> tuple[str, ...]:
    return next(f for f in dataclasses.fields(cfg) if f.name == name).metadata["choices"]


def _choice(cfg: Any, name: str, note: str = "") -> None:
    """A closed-set field's value against the values its declaration allows (what --help lists)."""
    value = getattr(cfg, name)
    if value not in _allowed(cfg, name):
        raise DaptError(f"{name} must be one of {', '.join(_allowed(cfg, name))}{note}, got {value!r}")


def _validate_data(cfg: DataConfig) -> None:
    if isinstance(cfg, TrainConfig) or cfg.max_seq_length:  # evaluation: 0 = as the model was trained
        _range(cfg, "max_seq_length", 8, note=" (0 = as trained, evaluation only)" if not isinstance(
            cfg, TrainConfig) else "")
    _range(cfg, "max_samples", 0, note=" (0 = all)")
    _range(cfg, "num_proc", 1)
    if cfg.prepared_dir and cfg.data_files:
        raise DaptError("pass either --prepared_dir or --data_files, not both (a prepared directory holds its data)")
    _choice(cfg, "empty_texts")
    _choice(cfg, "encoding_errors")
    classes = getattr(cfg, "num_labels", 0) or len(getattr(cfg, "label_names", []))
    for entry in cfg.label_map:
        name, _, value = entry.partition("=")
        if not name.strip() or not value.strip().isdigit() or (classes and int(value) >= classes):
            ids = f"0..{classes - 1}" if classes else "a class id (0, 1, ...)"
            raise DaptError(f"label_map entries are name=id with id {ids}, got {entry!r}")


def check_class_names(names: Sequence[str], where: str) -> None:
    """Class names must be non-empty and unique (case-insensitively: labels in the data match them so)."""
    seen: dict[str, str] = {}
    for n in names:
        if not n.strip():
            raise DaptError(f"{where}: class names must not be empty")
        if n.strip().lower() in seen:
            other = seen[n.strip().lower()]
            raise DaptError(f"{where}: duplicated class name {n!r}" + (f" (and {other!r})" if other != n else ""))
        seen[n.strip().lower()] = n


def _validate_labels(cfg: FinetuneConfig | EvalConfig) -> None:
    """num_labels and label_names agree; one class is not classification (Hugging Face would regress)."""
    if cfg.num_labels < 0 or cfg.num_labels == 1:
        raise DaptError(f"num_labels must be 0 (inferred) or at least 2, got {cfg.num_labels}")
    if cfg.label_names:
        check_class_names(cfg.label_names, "label_names")
        if len(cfg.label_names) < 2:
            raise DaptError(f"label_names must name at least 2 classes, got {len(cfg.label_names)}")
        if cfg.num_labels and len(cfg.label_names) != cfg.num_labels:
            raise DaptError(f"label_names has {len(cfg.label_names)} names but num_labels is {cfg.num_labels}")


def _validate_training(cfg: TrainConfig) -> None:
    for name in ("effective_batch_size", "micro_batch_size", "eval_batch_size", "num_epochs", "logging_steps",
                 "keep_last"):
        _range(cfg, name, 1)
    for name in ("eval_steps", "save_steps", "weight_decay", "peak_tflops"):
        _range(cfg, name, 0)
    _range(cfg, "num_workers", -1, note=" (-1 = auto)")
    _choice(cfg, "optimizer")
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
    _choice(cfg, "attn_implementation")
    _choice(cfg, "progress")
    if isinstance(cfg, MLMConfig):
        _range(cfg, "mlm_probability", 0, 1, low_open=True)
        if cfg.head_warmup_steps < 0 or (1 <= cfg.head_warmup_steps and not float(cfg.head_warmup_steps).is_integer()):
            raise DaptError("head_warmup_steps must be a step count (>= 1), a fraction in (0, 1) or 0 (off), "
                            f"got {cfg.head_warmup_steps:g}")
    _choice(cfg, "select_best", " for this stage")
    _range(cfg, "early_stopping_patience", 0, note=" (0 = off)")
    if cfg.early_stopping_patience and cfg.select_best == "none":
        raise DaptError("early_stopping_patience needs a metric to watch: pass --select_best "
                        f"{_allowed(cfg, 'select_best')[1]}")
    if cfg.select_best != "none" and cfg.validation_split == 0:
        raise DaptError("select_best needs held-out data: validation_split must be > 0")


def _validate_truncation(cfg: FinetuneConfig | EvalConfig) -> None:
    if cfg.truncation:  # evaluation: "" = as the model was trained
        _choice(cfg, "truncation")
    _range(cfg, "head_tokens", 0)
    budget = cfg.max_seq_length - 2
    if cfg.truncation == "head+tail" and cfg.max_seq_length and not 0 < cfg.head_tokens < budget:
        raise DaptError(f"head_tokens must be between 1 and max_seq_length - 3 = {budget - 1} for head+tail, "
                        f"got {cfg.head_tokens}")


def _validate_wandb(cfg: TrainConfig | EvalConfig) -> None:
    _choice(cfg, "wandb_mode")
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
        _validate_labels(cfg)
        _validate_truncation(cfg)
    if isinstance(cfg, EvalConfig):
        if not cfg.model_name_or_path:
            raise DaptError("--model_name_or_path is required (an exported model folder)")
        _range(cfg, "eval_batch_size", 1)
        _validate_eval_sets(cfg)
        _choice(cfg, "precision")
    if isinstance(cfg, (TrainConfig, EvalConfig)):
        _validate_wandb(cfg)
    if isinstance(cfg, ExportConfig) and not cfg.checkpoint:
        raise DaptError("--checkpoint is required")


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """The warmup field read as steps (>= 1) or as a fraction of all steps (< 1)."""
    if cfg.warmup >= 1:
        return int(cfg.warmup)
    return int(round(cfg.warmup * total_steps))


def head_warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """The head_warmup_steps field read as steps (>= 1) or as a fraction of all steps (< 1; at least one
    step); 0: off (and for stages without the field)."""
    value = getattr(cfg, "head_warmup_steps", 0)
    if value >= 1 or value == 0:
        return int(value)
    return max(1, int(value * total_steps))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
