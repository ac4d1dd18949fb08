"""Reading text data: local files in many formats (parquet, CSV, TSV, JSON lines, the aclImdb folder
tree or its .tar.gz) or a hub dataset, validated strictly into one table with `text` (and `label`).

Every bad input stops with one line naming the file, column, row and count. Two kinds of damage can
be repaired instead, by a switch, with a reported count: empty texts (`empty_texts=drop`) and bytes
that are not UTF-8 (`encoding_errors=replace`, decoded as U+FFFD).

The validated table is written once to the datasets cache, keyed by the inputs and settings, so that
`datasets.map` caches its tokenisation next to it: under `node_main_first` the first rank of the cache
(rank 0, or each node's local rank 0 when the cache is node-local) reads, checks and tokenises, and
the other ranks reuse both.

Memory does not grow with the corpus: parquet files and hub splits are streamed in chunks of
CHUNK_ROWS rows through the checks into the cached Arrow file, which is then memory-mapped. (CSV,
TSV, JSON and aclImdb inputs are read one whole file at a time: for very large corpora use parquet
or several files.)
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from dapt.config import DataConfig
from dapt.data.labels import LabelResolver, label_spec
from dapt.data.text import clean_text
from dapt.errors import DaptError, first_line
from dapt.io import atomic_write_text
from dapt.version import __version__

TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}
ARCHIVES = (".tar.gz", ".tgz")
# Split names of the hub's stanfordnlp/imdb -> folders of the original aclImdb tree.
ACLIMDB_SPLITS = {"train": "train", "test": "test", "unsupervised": "unsup", "unsup": "unsup"}
_ACLIMDB_MEMBER = re.compile(r"(?:^|/)(train|test)/(pos|neg|unsup)/([^/]+)\.txt$")
NEWLINE = b"\n"
CHUNK_ROWS = 10_000  # rows per chunk when streaming parquet files and hub splits
_TABLE_VERSION = 3  # bump when the cached table's layout or the validation rules change


@dataclass
class Part:
    """Rows read from one input: a table file, an aclImdb tree or archive, or a hub split.

    Text formats (CSV, TSV, JSON, aclImdb) are read whole into `columns`; parquet files and hub splits
    are streamed: `stream()` yields their rows in chunks of `CHUNK_ROWS`, so a corpus of any size is
    never held in memory at once."""

    origin: str
    columns: dict[str, list]  # the needed columns that the input has (streamed parts: empty)
    names: list[str]  # all its column names (for "missing column" errors)
    row_files: list[str] | None = None  # aclImdb: each row is its own file
    present: list[str] | None = None  # streamed parts: the needed columns that the input has
    chunks: Callable[[], Iterator[dict[str, list]]] | None = None  # streamed parts: the rows, in chunks

    def where(self, row: int) -> str:
        return self.row_files[row] if self.row_files else f"{self.origin} row {row}"

    def has(self, column: str) -> bool:
        return column in (self.present if self.chunks else self.columns)

    def stream(self) -> Iterator[dict[str, list]]:
        if self.chunks:
            yield from self.chunks()
        else:
            yield self.columns


@dataclass
class SourceReport:
    """What reading found and repaired; shown by the stages and stored in a prepared manifest."""

    source: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0
    rows: int = 0
    dropped_empty: int = 0
    replaced_bytes: int = 0  # undecodable byte sequences replaced with U+FFFD
    texts_with_replacements: int = 0
    first_replacement: str = ""
    label_names: list[str] = field(default_factory=list)  # the classes in id order (dapt/data/labels.py)
    label_counts: list[int] = field(default_factory=list)  # rows per class, as read

    def notes(self) -> list[str]:
        out = []
        if self.dropped_empty:
            out.append(f"{self.source}: dropped {self.dropped_empty} empty or non-text text(s) of {self.rows_read}")
        if self.replaced_bytes:
            out.append(f"{self.source}: replaced {self.replaced_bytes} byte sequence(s) that are not UTF-8 with "
                       f"U+FFFD in {self.texts_with_replacements} text(s) (first at {self.first_replacement})")
        return out


class _Decoder:
    """UTF-8 decoding under the `encoding_errors` policy, counting what it replaces."""

    def __init__(self, policy: str, report: SourceReport):
        self.policy = policy
        self.report = report

    def decode(self, data: bytes, where: str, lines: bool = False) -> str:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            at = f"line {data.count(NEWLINE, 0, exc.start) + 1}" if lines else f"byte {exc.start}"
            if self.policy != "replace":
                raise DaptError(f"{where}: bytes that are not valid UTF-8 at {at} (pass --encoding_errors replace "
                                f"to decode them as U+FFFD)") from None
            text = data.decode("utf-8-sig", errors="replace")
            # Each invalid sequence becomes one U+FFFD; genuine U+FFFD characters are not counted.
            self.report.replaced_bytes += text.count("\ufffd") - data.count("\ufffd".encode())
            self.report.texts_with_replacements += 1
            self.report.first_replacement = self.report.first_replacement or f"{where} {at}"
            return text


# --- inputs --------------------------------------------------------------------------------------

def aclimdb_root(path: Path) -> Path | None:
    """The aclImdb folder at `path` or just below it (`train/pos`, `test/neg`, ... inside)."""
    for cand in (path, path / "aclImdb"):
        if any((cand / s / c).is_dir() for s in ("train", "test") for c in ("pos", "neg", "unsup")):
            return cand
    return None


def expand_inputs(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """(kind, path) per input: kind is a table format, `aclimdb` (folder) or `aclimdb.tar` (archive)."""
    inputs: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            root = aclimdb_root(p)
            if root is not None:
                inputs.append(("aclimdb", root))
                continue
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TABLE_FORMATS)
            if not found:
                raise DaptError(f"no csv/json/jsonl/parquet/tsv files (nor an aclImdb train/test tree) in folder {raw}")
            inputs.extend((TABLE_FORMATS[f.suffix.lower()], f) for f in found)
        elif p.is_file():
            if p.name.lower().endswith(ARCHIVES):
                inputs.append(("aclimdb.tar", p))
            elif p.suffix.lower() in TABLE_FORMATS:
                inputs.append((TABLE_FORMATS[p.suffix.lower()], p))
            else:
                raise DaptError(f"unsupported data file type '{p.suffix}' for {raw} (use parquet, csv, tsv, jsonl, "
                                f"json, an aclImdb folder or its .tar.gz)")
        else:
            raise DaptError(f"data file not found: {raw}")
    return inputs


def _first_line(exc: Exception) -> str:
    text = first_line(exc)
    return text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"


def read_parquet(path: Path, needed: Sequence[str], decoder: _Decoder) -> Part:
    """A parquet file, streamed in record batches of CHUNK_ROWS rows (one batch in memory at a time)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DaptError(f"cannot read {path}: {_first_line(exc)}") from None
    present = [c for c in needed if c in names]

    def chunks() -> Iterator[dict[str, list]]:
        start = 0
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=CHUNK_ROWS, columns=present)
        except Exception as exc:
            raise DaptError(f"cannot read {path}: {_first_line(exc)}") from None
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:
                raise DaptError(f"cannot read {path}: {_first_line(exc)}") from None
            if batch is None:
                return
            columns: dict[str, list] = {}
            for name in batch.schema.names:
                col = batch.column(name)
                if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                    try:
                        col.validate(full=True)  # parquet writers can store bytes that are not UTF-8
                    except pa.ArrowInvalid:
                        col = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary())
                values = col.to_pylist()
                if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                    values = [decoder.decode(v, f"{path} row {start + i}") if v is not None else None
                              for i, v in enumerate(values)]
                columns[name] = values
            start += batch.num_rows
            yield columns

    return Part(str(path), {}, names, present=present, chunks=chunks)


def read_delimited(path: Path, delimiter: str, needed: Sequence[str], decoder: _Decoder) -> Part:
    text = decoder.decode(path.read_bytes(), str(path), lines=True)
    csv.field_size_limit(2**31 - 1)  # long documents are normal here

    def parse(quoting: int) -> list[list[str]]:
        try:
            return [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting) if r]
        except csv.Error as exc:
            raise DaptError(f"cannot read {path}: {exc}") from None

    rows = parse(csv.QUOTE_MINIMAL)
    if delimiter == "\t":
        # Many TSV files have no quoting, and a review that starts with an unbalanced '"' would swallow
        # the lines after it (uci-sentences: 749 rows instead of 1,000). When every line is one whole
        # record, lines are records.
        lines = parse(csv.QUOTE_NONE)
        if len(lines) != len(rows) and all(len(r) == len(lines[0]) for r in lines):
            rows = lines
    if not rows:
        raise DaptError(f"{path}: empty file (a header row with column names is needed)")
    header, body = rows[0], rows[1:]
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DaptError(f"{path} row {i}: {len(row)} field(s) but the header has {len(header)} "
                            f"({'tab' if delimiter == chr(9) else 'comma'}-separated; quote fields that contain one)")
    columns = {name: [row[j] for row in body] for j, name in enumerate(header) if name in needed}
    return Part(str(path), columns, header)


def read_json(path: Path, needed: Sequence[str], decoder: _Decoder) -> Part:
    """JSON lines (one object per line), or for .json files also one array of objects."""
    text = decoder.decode(path.read_bytes(), str(path), lines=True)
    records: list[Any] = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DaptError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        where = lambda i: f"{path} row {i}"  # noqa: E731
    else:
        line_of: list[int] = []
        for n, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DaptError(f"{path} line {n}: invalid JSON ({exc.msg})") from None
                line_of.append(n)
        where = lambda i: f"{path} line {line_of[i]}"  # noqa: E731
    names: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DaptError(f"{where(i)}: expected a JSON object with named fields, got {type(rec).__name__}")
        names.extend(k for k in rec if k not in names)
    columns = {name: [rec.get(name) for rec in records] for name in names if name in needed}
    return Part(str(path), columns, names)


def _aclimdb_key(label: str, name: str) -> tuple:
    """The hub's order: per split, negatives then positives (then unlabelled), each by review id."""
    stem = name.split("_")[0]
    return ("neg", "pos", "unsup").index(label), int(stem) if stem.isdigit() else 0, name


def read_aclimdb(kind: str, path: Path, split: str, text_col: str, label_col: str | None,
                 decoder: _Decoder) -> Part:
    """The original aclImdb tree (or its .tar.gz): `<split>/pos|neg|unsup/<id>_<rating>.txt`.

    `split` is a hub split name or several joined by '+' (`train+unsupervised`); pos -> 1, neg -> 0.
    """
    folders = []
    for name in split.split("+"):
        if name not in ACLIMDB_SPLITS:
            raise DaptError(f"{path}: unknown aclImdb split '{name}' (use train, test or unsupervised, joined by '+')")
        folders.append(ACLIMDB_SPLITS[name])
    if label_col and "unsup" in folders:
        raise DaptError(f"{path}: aclImdb split '{split}' includes unlabelled reviews (unsup); "
                        f"a labelled split (train or test) is needed")
    found: list[tuple[tuple, str, str, bytes]] = []  # (order, label, location, bytes)
    if kind == "aclimdb":
        for top in dict.fromkeys(folders):
            group = [("train", "unsup")] if top == "unsup" else [(top, "neg"), (top, "pos")]
            for folder, label in group:
                for f in sorted((path / folder / label).glob("*.txt")):
                    found.append(((folders.index(top), *_aclimdb_key(label, f.name)), label, str(f), f.read_bytes()))
    else:
        try:
            with tarfile.open(path, "r|*") as tar:  # streamed: one pass, nothing extracted to disk
                for member in tar:
                    m = _ACLIMDB_MEMBER.search(member.name)
                    if not (m and member.isfile()):
                        continue
                    folder, label, stem = m.groups()
                    top = "unsup" if label == "unsup" else folder
                    if top in folders:
                        data = tar.extractfile(member).read()
                        found.append(((folders.index(top), *_aclimdb_key(label, stem)), label,
                                      f"{path}:{member.name}", data))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DaptError(f"cannot read archive {path}: {_first_line(exc)}") from None
    if not found:
        raise DaptError(f"{path}: no reviews for split '{split}' (expected aclImdb/{folders[0]}/pos|neg|unsup/*.txt)")
    found.sort(key=lambda r: r[0])
    texts = [decoder.decode(data, where) for _, _, where, data in found]
    columns: dict[str, list] = {text_col: texts}
    if label_col:
        columns[label_col] = [{"neg": 0, "pos": 1}.get(label) for _, label, _, _ in found]
    return Part(str(path), columns, list(columns), row_files=[where for _, _, where, _ in found])


def read_hub(cfg: DataConfig, needed: Sequence[str]) -> tuple[Part, str]:
    """A hub split (datasets' own memory-mapped cache), streamed in chunks; and its fingerprint."""
    import datasets

    source = f"{cfg.dataset_name} [{cfg.dataset_split}]"
    try:
        ds = datasets.load_dataset(cfg.dataset_name, split=cfg.dataset_split)
    except Exception as exc:
        raise DaptError(f"cannot load dataset {source} (offline? pass local files with --data_files): "
                        f"{first_line(exc)}") from None
    present = [c for c in needed if c in ds.column_names]

    def chunks() -> Iterator[dict[str, list]]:
        yield from ds.select_columns(present).iter(batch_size=CHUNK_ROWS)

    return Part(source, {}, list(ds.column_names), present=present, chunks=chunks), ds._fingerprint


# --- validation ----------------------------------------------------------------------------------

class _Rows:
    """Row positions across all parts, for messages."""

    def __init__(self, parts: list[Part]):
        self.single = len(parts) == 1 and not parts[0].row_files

    def where(self, i: int, part: Part, row: int) -> str:
        """Row `i` of all parts in order, which is row `row` of `part`."""
        return f"row {i}" if self.single else part.where(row)  # one file: the message already names it


def _label_kind(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "number" if isinstance(value, (int, float)) else None


@dataclass
class _Checks:
    """What validation finds, gathered chunk by chunk over all rows. The errors are raised once every
    row was seen, in a fixed order, so a message (counts, first position) does not depend on chunking."""

    rows: int = 0
    kept: int = 0
    non_text: int = 0
    non_text_kinds: set = field(default_factory=set)
    first_non_text: tuple[str, Any] | None = None
    empty: int = 0
    first_empty: str = ""
    label_kinds: dict = field(default_factory=dict)  # kind -> (row, where, value) of its first value
    labels: LabelResolver | None = None  # ids and classes (dapt/data/labels.py)

    def failed(self, empty_texts: str) -> bool:
        return bool(self.non_text or (self.empty and empty_texts != "drop") or len(self.label_kinds) > 1
                    or (self.labels and self.labels.bad.rows))

    def raise_errors(self, cfg: DataConfig, label_col: str | None, report: SourceReport) -> None:
        text_col = cfg.text_column
        if not self.rows:
            raise DaptError(f"{report.source}: no rows")
        if self.non_text:
            kinds = sorted(self.non_text_kinds | ({"str"} if self.non_text < self.rows else set()))
            where, value = self.first_non_text
            raise DaptError(f"{report.source}: {self.non_text} non-text value(s) in column '{text_col}', mixed types "
                            f"{'/'.join(kinds)} (first at {where}: {value!r})")
        if self.empty and cfg.empty_texts != "drop":
            raise DaptError(f"{report.source}: {self.empty} empty or non-text value(s) in column '{text_col}' "
                            f"(first at {self.first_empty}; pass --empty_texts drop to drop them)")
        if len(self.label_kinds) > 1:
            (_, wa, a), (_, wb, b) = sorted(self.label_kinds.values(), key=lambda r: r[0])
            raise DaptError(f"{report.source}: column '{label_col}' mixes types: {_label_kind(a)} at {wa} "
                            f"({a!r}) and {_label_kind(b)} at {wb} ({b!r})")
        problem = self.labels.finish() if self.labels else None
        if problem:
            raise DaptError(f"{report.source}: {problem.replace('{col}', str(label_col))}")
        if not self.kept:
            raise DaptError(f"{report.source}: every text is empty")


def _int_ids(ids: list) -> bool:
    """One type per id column: ints (or missing) stay ints; any other value makes the column text."""
    return all(isinstance(x, int) or x is None for x in ids)


class _TableWriter:
    """The validated rows, appended chunk by chunk to an Arrow file (datasets' format): `text`, `row`
    (position in the input before empty texts were dropped), `label` ids, and the input's `id`s."""

    def __init__(self, path: Path, labels: bool, ids: bool):
        self.path, self.labels, self.ids = path, labels, ids
        self.writer: Any = None
        self.text_ids = False  # the id column holds text (some id was not an int)

    def _open(self, path: Path) -> Any:
        from datasets.arrow_writer import ArrowWriter

        return ArrowWriter(path=str(path))

    def _ids_as_text(self) -> None:
        """An id that is not an int after int ids were written: rewrite the file with text ids (one
        streamed pass, batch by batch), then go on."""
        import pyarrow as pa
        import pyarrow.compute as pc

        self.text_ids = True
        if self.writer is None:
            return
        self.writer.finalize()
        self.writer.close()
        old = self.path.with_name(self.path.name + ".int-ids")
        self.path.replace(old)
        self.writer = self._open(self.path)
        with pa.memory_map(str(old)) as source:
            for batch in pa.ipc.open_stream(source):
                i = batch.schema.get_field_index("id")
                batch = batch.set_column(i, "id", pc.cast(batch.column(i), pa.string()))
                self.writer.write_table(pa.Table.from_batches([batch]))
        old.unlink()

    def write(self, texts: list[str], rows: list[int], labels: list[int] | None, ids: list | None,
              int_ids: bool) -> None:
        import pyarrow as pa

        if self.ids and not int_ids and not self.text_ids:
            self._ids_as_text()
        columns: dict[str, Any] = {"text": pa.array(texts, pa.string()), "row": pa.array(rows, pa.int64())}
        if self.labels:
            columns["label"] = pa.array(labels, pa.int64())
        if self.ids:
            columns["id"] = (pa.array([None if x is None else str(x) for x in ids], pa.string()) if self.text_ids
                             else pa.array(ids, pa.int64()))
        if self.writer is None:
            self.writer = self._open(self.path)
        self.writer.write_table(pa.table(columns))

    def finish(self) -> None:
        self.writer.finalize()
        self.writer.close()

    def discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _remap_labels(path: Path, remap: dict[int, int]) -> None:
    """Rewrite the table's label column through `remap`, one record batch at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets.arrow_writer import ArrowWriter

    old = path.with_name(path.name + ".provisional")
    path.replace(old)
    keys, values = pa.array(list(remap), pa.int64()), pa.array(list(remap.values()), pa.int64())
    writer = ArrowWriter(path=str(path))
    with pa.memory_map(str(old)) as source:
        for batch in pa.ipc.open_stream(source):
            i = batch.schema.get_field_index("label")
            column = batch.column(i)
            mapped = pc.take(values, pc.index_in(column, value_set=keys))
            batch = batch.set_column(i, "label", pc.if_else(pc.less(column, 0), mapped, column))
            writer.write_table(pa.Table.from_batches([batch]))
    writer.finalize()
    writer.close()
    old.unlink()


def write_validated(parts: list[Part], cfg: DataConfig, label_col: str | None, report: SourceReport,
                    path: Path) -> None:
    """Check every row of every part and write the valid rows (empty texts dropped if allowed) to the
    Arrow file `path`, one chunk at a time: memory holds one chunk, not the corpus. Nothing is left at
    `path` when a check fails; another process never sees a half-written file."""
    text_col = cfg.text_column
    for p in parts:
        for col in [text_col] + ([label_col] if label_col else []):
            if not p.has(col):
                raise DaptError(f"{p.origin}: missing column '{col}' (columns: {', '.join(p.names)})")
    with_ids = bool(cfg.id_column) and any(p.has(cfg.id_column) for p in parts)
    rows, checks = _Rows(parts), _Checks(labels=LabelResolver(label_spec(cfg)) if label_col else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _TableWriter(path.with_name(f"{path.name}.{os.getpid()}.tmp"), label_col is not None, with_ids)
    try:
        for part in parts:
            local = 0  # row number inside the part
            for chunk in part.stream():
                texts = chunk[text_col]
                base = checks.rows
                keep: list[int] = []
                for j, t in enumerate(texts):
                    if t is not None and not isinstance(t, str):
                        checks.non_text += 1
                        checks.non_text_kinds.add(type(t).__name__)
                        checks.first_non_text = checks.first_non_text or (rows.where(base + j, part, local + j), t)
                    elif t is None or not clean_text(t):
                        checks.empty += 1
                        checks.first_empty = checks.first_empty or rows.where(base + j, part, local + j)
                    else:
                        keep.append(j)
                labels: list[int] | None = None
                if label_col:
                    labels = []
                    for j, y in enumerate(chunk[label_col]):
                        k = _label_kind(y)
                        if k and k not in checks.label_kinds:
                            checks.label_kinds[k] = (base + j, rows.where(base + j, part, local + j), y)
                        labels.append(checks.labels.value(y, base + j, rows.where(base + j, part, local + j)))
                checks.rows += len(texts)
                local += len(texts)
                if checks.failed(cfg.empty_texts) or not keep:
                    continue  # an error follows: keep counting, stop writing
                ids = chunk.get(cfg.id_column) if with_ids else None
                ids = ids if ids is not None or not with_ids else [None] * len(texts)
                writer.write([texts[j] for j in keep], [base + j for j in keep],
                             [labels[j] for j in keep] if labels is not None else None,
                             [ids[j] for j in keep] if ids is not None else None,
                             _int_ids(ids) if ids is not None else True)
                checks.kept += len(keep)
        report.rows_read = checks.rows
        checks.raise_errors(cfg, label_col, report)
        report.dropped_empty = checks.empty
        report.rows = checks.kept
        writer.finish()
        if checks.labels:
            if checks.labels.remap:  # classes named by the data: provisional ids -> sorted names' ids
                _remap_labels(writer.path, checks.labels.remap)
            report.label_names, report.label_counts = checks.labels.names, checks.labels.counts()
        writer.path.replace(path)
    except BaseException:
        writer.discard()
        raise


# --- the cached table ----------------------------------------------------------------------------

def _describe(paths: Sequence[str]) -> str:
    return ", ".join(paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")


def source_key(cfg: DataConfig, label_col: str | None) -> tuple[str, list[tuple[str, Path]]]:
    """A key for the inputs (paths, sizes, modification times) and the settings that shape the table."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k in ("text_column", "dataset_split", "label_map", "empty_texts", "encoding_errors", "id_column",
                         "num_labels", "label_names")}
    key: dict[str, Any] = {"version": [__version__, _TABLE_VERSION], "label_column": label_col, **settings}
    inputs: list[tuple[str, Path]] = []
    if cfg.data_files:
        inputs = expand_inputs(cfg.data_files)
        files = []
        for kind, path in inputs:
            members = sorted(path.rglob("*.txt")) if kind == "aclimdb" else [path]  # an edited review counts
            files.extend([str(f.resolve()), st.st_size, st.st_mtime_ns] for f in members for st in [f.stat()])
        key["files"] = files
    else:
        key["dataset"] = cfg.dataset_name  # the hub's own fingerprint is added once loaded
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24], inputs


def read_source(cfg: DataConfig, label_col: str | None, inputs: list[tuple[str, Path]], path: Path) -> SourceReport:
    """Read and validate every input (the hub split when there are no local inputs) into the Arrow file
    `path`, streamed: parquet files and hub splits chunk by chunk, the other formats a file at a time."""
    needed = [cfg.text_column] + ([label_col] if label_col else []) + ([cfg.id_column] if cfg.id_column else [])
    if not inputs:
        part, fingerprint = read_hub(cfg, needed)
        report = SourceReport(part.origin, inputs=[{"dataset": cfg.dataset_name, "split": cfg.dataset_split,
                                                    "datasets_fingerprint": fingerprint}])
        write_validated([part], cfg, label_col, report, path)
        return report
    report = SourceReport(_describe([str(p) for _, p in inputs]))
    decoder = _Decoder(cfg.encoding_errors, report)
    parts = []
    for kind, path_in in inputs:
        report.inputs.append({"path": str(path_in.resolve()), "format": kind,
                              "bytes": path_in.stat().st_size if path_in.is_file() else None})
        if kind in ("aclimdb", "aclimdb.tar"):
            parts.append(read_aclimdb(kind, path_in, cfg.dataset_split, cfg.text_column, label_col, decoder))
        elif kind == "parquet":
            parts.append(read_parquet(path_in, needed, decoder))  # streamed: read while writing
        elif kind in ("csv", "tsv"):
            parts.append(read_delimited(path_in, "\t" if kind == "tsv" else ",", needed, decoder))
        else:
            parts.append(read_json(path_in, needed, decoder))
    write_validated(parts, cfg, label_col, report, path)
    return report


def _cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "dapt_tables"


def load_source(cfg: DataConfig, seed: int, label_col: str | None = None) -> tuple[Any, SourceReport]:
    """A file-backed (memory-mapped) `datasets.Dataset` with `text` (and `label` ids), and the report
    of reading it.

    The validated table is cached by `source_key`: a second reader (another rank, a later run) skips
    reading and checking. `max_samples` then takes a seeded random subset."""
    import datasets

    datasets.disable_progress_bars()
    digest, inputs = source_key(cfg, label_col)
    if not inputs:  # a hub split: its own fingerprint says whether the data changed
        digest = hashlib.sha256(f"{digest}{read_hub(cfg, [])[1]}".encode()).hexdigest()[:24]
    path = _cache_dir() / f"table-{digest}.arrow"
    report_path = path.with_suffix(".json")
    if path.is_file() and report_path.is_file():
        report = SourceReport(**json.loads(report_path.read_text()))
    else:
        report = read_source(cfg, label_col, inputs, path)
        atomic_write_text(report_path, json.dumps(asdict(report)))
    ds = datasets.Dataset.from_file(str(path))
    if cfg.max_samples and cfg.max_samples < len(ds):
        ds = ds.shuffle(seed=seed).select(range(cfg.max_samples))
    return ds, report


def print_notes(report: SourceReport) -> None:
    """Repairs are reported once (by rank 0 under a launcher), on stderr beside the job's log."""
    if os.environ.get("RANK", "0") == "0":
        for note in report.notes():
            print(f"dapt: note: {note}", file=sys.stderr, flush=True)


def load_table(cfg: DataConfig, seed: int, label_column: str | None = None) -> Any:
    """A `datasets.Dataset` with a validated `text` column (and `label` when a label column is named).

    Formats, label names, validation and repairs: above."""
    ds, report = load_source(cfg, seed, label_column)
    print_notes(report)
    return ds


def split_validation(ds: Any, fraction: float, seed: int) -> tuple[Any, Any | None]:
    """Split off a seeded held-out slice (at least one example) for periodic evaluation."""
    if fraction <= 0:
        return ds, None
    n_val = max(1, int(round(len(ds) * fraction)))
    if n_val >= len(ds):
        raise DaptError(f"validation_split {fraction} leaves no training data out of {len(ds)} examples")
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
