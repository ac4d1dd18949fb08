"""Class labels: how the values in a label column become class ids 0..K-1, and the classes' names.

A label is an id (an int, an integral float or a digit string) or a name. Names are matched without
regard to case and surrounding spaces: `--label_names` (the classes in id order), `--label_map name=id`
entries, and, when no names are given, the built-in negative/neg = 0, positive/pos = 1.

Without `--num_labels` and `--label_names` the classes come from the training data:
* ids (or known names): K = the number of ids 0, 1, 2, ... that all occur (at least 2, the binary default),
  so a stray id past a gap (0, 1, 3) is reported as an error, not taken for a fourth class;
* names only, none of them known: the distinct names, sorted, are the classes (ids in that order).
Names default to negative/positive for two classes (IMDB), else to the names seen, else to the id itself.

Evaluation never infers: its classes are the model's (`id2label` in config.json).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from dapt.config import ID2LABEL, EvalConfig

# Label names understood without configuration (case-insensitive); `label_map` adds more.
LABEL_NAMES = {"negative": 0, "neg": 0, "positive": 1, "pos": 1}
ALIASES = {"neg": "negative", "pos": "positive"}  # with --label_names: short names of the built-in classes


@dataclass(frozen=True)
class LabelSpec:
    """What the config says about the classes before any data is read."""

    names: tuple[str, ...] = ()  # the classes in id order; () = from the data
    num_labels: int = 0  # 0 = inferred from the data
    known: dict[str, int] = field(default_factory=dict)  # lower-cased name -> id
    source: str = ""  # where fixed names come from, for messages ("label_names", "the model")

    @property
    def fixed(self) -> bool:
        return bool(self.names)


def label_spec(cfg: Any) -> LabelSpec:
    """The spec of a data config: `label_names`, `num_labels` (0 = infer) and `label_map`. An evaluation's
    names are the model's (resolved from its config before any data is read)."""
    source = "the model" if isinstance(cfg, EvalConfig) else "label_names"
    names = tuple(getattr(cfg, "label_names", None) or ())
    if names:
        known = {n.strip().lower(): i for i, n in enumerate(names)}
        for alias, canonical in ALIASES.items():
            if canonical in known:
                known.setdefault(alias, known[canonical])
    else:
        known = dict(LABEL_NAMES)
    for entry in getattr(cfg, "label_map", ()):
        name, _, value = entry.partition("=")
        known[name.strip().lower()] = int(value)
    return LabelSpec(names, int(getattr(cfg, "num_labels", 0) or len(names)), known, source)


def id_set_text(k: int) -> str:
    """{0, 1} for two classes, {0, ..., 12} for thirteen."""
    return "{" + (", ".join(map(str, range(k))) if k <= 6 else f"0, ..., {k - 1}") + "}"


def is_default_binary(names: Sequence[str]) -> bool:
    """The IMDB classes: the wording of cards and demo pages stays the sentiment one."""
    return list(names) == [ID2LABEL[0], ID2LABEL[1]]


@dataclass
class _Seen:
    rows: int = 0
    first: tuple[int, str, Any] | None = None  # (row over all inputs, where, value)

    def add(self, row: int, where: str, value: Any) -> None:
        self.rows += 1
        if self.first is None or row < self.first[0]:
            self.first = (row, where, value)


class LabelResolver:
    """Maps label values to ids row by row, then decides the classes once every row was seen.

    Names that the spec does not know get provisional ids -1, -2, ... (first seen first); `finish`
    gives them their final ids when they define the classes (sorted names), and `remap` says how."""

    def __init__(self, spec: LabelSpec):
        self.spec = spec
        self.by_id: dict[int, _Seen] = {}
        self.named: dict[int, str] = {}  # id -> the name the data used for it (the first one seen)
        self.unknown: dict[str, int] = {}  # lower-cased name -> provisional id
        self.unknown_shown: dict[int, str] = {}  # provisional id -> the name as first written
        self.bad = _Seen()  # values that are no label at all (bools, negative ids, known-bad names)
        self.names: list[str] = []
        self.remap: dict[int, int] = {}  # provisional -> final id (inferred names only)

    def value(self, y: Any, row: int, where: str) -> int | None:
        """The (provisional) id of one value; None for a value that can never be a label."""
        label: int | None = None
        if isinstance(y, bool) or y is None:
            label = None
        elif isinstance(y, (int, float)):
            label = int(y) if float(y).is_integer() and y >= 0 else None
        elif isinstance(y, str):
            key = y.strip().lower()
            if key in self.spec.known:
                label = self.spec.known[key]
                self.named.setdefault(label, ID2LABEL[LABEL_NAMES[key]] if key in LABEL_NAMES else y.strip())
            elif key.isdigit():
                label = int(key)
            elif key and not self.spec.fixed:
                label = self.unknown.setdefault(key, -1 - len(self.unknown))
                self.unknown_shown.setdefault(label, y.strip())
        if label is None:
            self.bad.add(row, where, y)
            return None
        self.by_id.setdefault(label, _Seen()).add(row, where, y)
        return label

    def finish(self) -> str | None:
        """Decide the classes (self.names, self.remap); an error line (without the source) if the labels
        do not make a valid set of classes."""
        spec = self.spec
        ids = {i for i in self.by_id if i >= 0}
        provisional = {i for i in self.by_id if i < 0}
        if provisional and not ids:  # names only, none known: they are the classes
            order = sorted(provisional, key=lambda i: (self.unknown_shown[i].lower(), self.unknown_shown[i]))
            if spec.num_labels and spec.num_labels != len(order):
                shown = ", ".join(self.unknown_shown[i] for i in order)
                return (f"num_labels is {spec.num_labels} but the label column holds {len(order)} distinct "
                        f"name(s): {shown}")
            self.remap = {p: k for k, p in enumerate(order)}
            self.names = [self.unknown_shown[p] for p in order]
            return self._outside(len(order), set())
        if spec.num_labels:
            k = spec.num_labels
        else:  # ids 0, 1, 2, ... that all occur; a gap ends the classes (a typo, not a new class)
            k = 0
            while k in ids:
                k += 1
            k = max(k, 2)
        self.names = list(spec.names) or [self._default_name(i, k) for i in range(k)]
        return self._outside(k, {i for i in self.by_id if i >= k or i < 0})

    def _outside(self, k: int, invalid: set[int]) -> str | None:
        wrong = [self.by_id[i] for i in invalid] + ([self.bad] if self.bad.rows else [])
        if not wrong:
            return None
        n = sum(s.rows for s in wrong)
        _, where, value = min((s.first for s in wrong if s.first), key=lambda f: f[0])
        accepted = ", ".join(sorted(self.spec.known)) or "none"
        hint = ""
        if not self.spec.num_labels and not self.spec.fixed:
            hint = ("; inferred classes are the ids 0..K-1 that all occur, or the distinct names when none is "
                    "known; --num_labels, --label_names or --label_map set them")
        elif self.spec.source == "the model":
            hint = f"; the model's classes are {', '.join(self.spec.names)}"
        return (f"{n} label(s) outside {id_set_text(k)} in column '{{col}}' (first at {where}: {value!r}; "
                f"names accepted: {accepted}{hint})")

    def _default_name(self, i: int, k: int) -> str:
        if k == 2:  # the binary default, whatever the data called its classes (as before K > 2 existed)
            return ID2LABEL[i]
        return self.named.get(i, str(i))

    def counts(self) -> list[int]:
        """Rows per final class id."""
        out = [0] * len(self.names)
        for i, seen in self.by_id.items():
            final = self.remap.get(i, i)
            if 0 <= final < len(out):
                out[final] += seen.rows
        return out


def summary_line(names: Sequence[str], counts: Sequence[int], what: str = "training data") -> str:
    """`labels: 4 classes in the training data: World 30, Sports 31, Business 29, Sci/Tech 30`"""
    parts = ", ".join(f"{n} {c}" for n, c in zip(names, counts))
    empty = [n for n, c in zip(names, counts) if not c]
    note = f" (no examples of {', '.join(empty)})" if empty else ""
    return f"labels: {len(names)} classes in the {what}: {parts}{note}"


def id2label(names: Sequence[str]) -> dict[int, str]:
    return dict(enumerate(names))


def class_names(model_id2label: Mapping[Any, str] | None) -> list[str]:
    """A model config's classes in id order; Hugging Face's placeholder LABEL_0/LABEL_1 (a model never
    fine-tuned by dapt, or an MLM checkpoint) read as the binary default negative/positive."""
    names = [v for _, v in sorted((int(k), v) for k, v in (model_id2label or {}).items())]
    return [ID2LABEL[0], ID2LABEL[1]] if names in ([], ["LABEL_0", "LABEL_1"]) else names
