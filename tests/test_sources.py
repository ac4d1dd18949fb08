"""Reading every supported format, label names, and each bad-input case: one clear DaptError (or a
counted repair when the switch allows it). Real files from ../shared/data where present."""
import csv
import io
import json
import tarfile

import pytest
from conftest import ROOT, SHARED_IMDB

from dapt.config import FinetuneConfig, MLMConfig
from dapt.data.sources import load_source
from dapt.errors import DaptError

pytestmark = pytest.mark.data
SHARED = ROOT.parent / "shared" / "data"
ROWS = [("A great film, loved it.", 1), ("Dull, long and badly acted.", 0),
        ("Warm and funny.<br /><br />Go see it.", 1), ("The worst film of the year.", 0)]
NAMES = {1: "pos", 0: "neg"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Validated tables and their tokenisations go to a test-owned datasets cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def load(files, label="label", text="text", **kw):
    cfg = FinetuneConfig(output_dir="x", data_files=[str(f) for f in files], text_column=text, **kw)
    ds, report = load_source(cfg, 0, label)
    return ds["text"], ds["label"] if label else None, report


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_delimited(path, header, rows, delimiter):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue())
    return path


def write_format(fmt, path, text_col="text", label_col="label"):
    """ROWS in `fmt`, with labels as ints (parquet, jsonl) or names (csv: pos/neg, tsv, json)."""
    import pandas as pd

    if fmt == "parquet":
        pd.DataFrame({text_col: [t for t, _ in ROWS], label_col: [y for _, y in ROWS], "id": range(4)}).to_parquet(path)
    elif fmt == "csv":
        write_delimited(path, [label_col, text_col], [[NAMES[y], t] for t, y in ROWS], ",")
    elif fmt == "tsv":
        write_delimited(path, [text_col, label_col], [[t, ["negative", "positive"][y]] for t, y in ROWS], "\t")
    elif fmt == "jsonl":
        write_jsonl(path, [{text_col: t, label_col: y} for t, y in ROWS])
    else:
        path.write_text(json.dumps([{text_col: t, label_col: ["Negative", "POSITIVE"][y]} for t, y in ROWS]))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl", "json"])
def test_each_format_gives_the_same_table(fmt, tmp_path):
    texts, labels, report = load([write_format(fmt, tmp_path / f"d.{fmt}")])
    assert texts == [t for t, _ in ROWS] and labels == [y for _, y in ROWS]
    assert report.rows == 4 and report.dropped_empty == 0 and report.replaced_bytes == 0
    # configurable column names
    renamed = write_format(fmt, tmp_path / f"r.{fmt}", text_col="review", label_col="sentiment")
    texts, labels, _ = load([renamed], label="sentiment", text="review")
    assert texts == [t for t, _ in ROWS] and labels == [y for _, y in ROWS]


def test_folder_of_mixed_files(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write_format("parquet", data / "a.parquet")
    write_format("jsonl", data / "sub" / "b.jsonl")
    (data / "README.md").write_text("not data")
    texts, labels, report = load([data])
    assert texts == [t for t, _ in ROWS] * 2 and labels == [y for _, y in ROWS] * 2
    assert [i["format"] for i in report.inputs] == ["parquet", "jsonl"]


def test_label_values_ints_strings_and_custom_names(tmp_path):
    f = write_delimited(tmp_path / "l.csv", ["text", "label"],
                        [["a", "0"], ["b", "1"], ["c", " Positive "], ["d", "NEG"], ["e", "good"], ["f", "bad"]], ",")
    _, labels, _ = load([f], label_map=["good=1", "bad=0"])
    assert labels == [0, 1, 1, 0, 1, 0]
    with pytest.raises(DaptError, match=r"2 label\(s\) outside \{0, 1\}.*row 4: 'good'"):
        load([f])  # without the label_map
    f = write_jsonl(tmp_path / "f.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0}])
    assert load([f])[1] == [1, 0]  # integral floats (e.g. from pandas with NaN elsewhere) are ids


def make_aclimdb(root, duplicate=None):
    """A miniature of the original aclImdb tree, with the files that are not reviews too."""
    reviews = {
        ("train", "pos"): {"10_9": "Great fun.", "2_8": "Lovely film."},
        ("train", "neg"): {"3_1": "Awful.<br />Just awful.", "12_2": "Boring."},
        ("train", "unsup"): {"5_0": "Saw it last week.", "1_0": "An old film."},
        ("test", "pos"): {"0_10": "A masterpiece."},
        ("test", "neg"): {"7_3": duplicate or "Not worth it."},
    }
    for (split, label), files in reviews.items():
        (root / split / label).mkdir(parents=True)
        for name, text in files.items():
            (root / split / label / f"{name}.txt").write_text(text)
    (root / "imdb.vocab").write_text("the\nfilm\n")
    (root / "train" / "urls_pos.txt").write_text("http://example.invalid\n")
    (root / "train" / "labeledBow.feat").write_text("1 0:1\n")
    return root


def test_aclimdb_tree_and_archive(tmp_path):
    tree = make_aclimdb(tmp_path / "aclImdb")
    expected_train = (["Awful.<br />Just awful.", "Boring.", "Lovely film.", "Great fun."], [0, 0, 1, 1])
    assert load([tree])[:2] == expected_train  # negatives then positives, each by review id
    assert load([tmp_path])[:2] == expected_train  # the folder that holds aclImdb/
    assert load([tree], dataset_split="test")[:2] == (["Not worth it.", "A masterpiece."], [0, 1])
    mlm = MLMConfig(output_dir="x", data_files=[str(tree)], dataset_split="train+unsupervised")
    texts = load_source(mlm, 0)[0]["text"]
    assert texts[:4] == expected_train[0] and texts[4:] == ["An old film.", "Saw it last week."]
    with pytest.raises(DaptError, match="includes unlabelled reviews"):
        load([tree], dataset_split="unsupervised")

    archive = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="aclImdb")
    assert load([archive])[:2] == expected_train
    assert load([archive], dataset_split="test")[:2] == (["Not worth it.", "A masterpiece."], [0, 1])


BAD = {
    "missing text column": ("jsonl", [{"review": "x", "label": 1}] * 3, {}, r"e.jsonl: missing column 'text' \(columns: review, label\)"),
    "missing label column": ("csv", [["text"], ["fine"]], {}, "missing column 'label'"),
    "empty text": ("jsonl", [{"text": "ok", "label": 1}, {"text": " \t ", "label": 0}, {"text": None, "label": 1},
                             {"text": "<br />", "label": 0}], {},
                   r"3 empty or non-text value\(s\) in column 'text' \(first at row 1; pass --empty_texts drop"),
    "label outside set": ("jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 2}], {},
                          r"1 label\(s\) outside \{0, 1\} in column 'label' \(first at row 1: 2; names accepted"),
    "unknown label name": ("csv", [["text", "label"], ["a", "pos"], ["b", "meh"]], {},
                           r"outside \{0, 1\}.*row 1: 'meh'"),
    "bool label": ("jsonl", [{"text": "a", "label": True}], {}, r"outside \{0, 1\}.*: True"),
    "mixed label types": ("jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "neg"}], {},
                          r"column 'label' mixes types: number at row 0 \(1\) and text at row 1 \('neg'\)"),
    "non-text values": ("jsonl", [{"text": "a", "label": 1}, {"text": 42, "label": 0}], {},
                        r"1 non-text value\(s\) in column 'text', mixed types int/str \(first at row 1: 42\)"),
    "ragged csv row": ("csv", [["text", "label"], ["a", "1"], ["b", "0", "extra"]], {},
                       r"row 1: 3 field\(s\) but the header has 2"),
    "invalid json line": ("jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', {}, r"line 2: invalid JSON"),
    "not an object": ("jsonl", '["a", 1]\n', {}, "expected a JSON object"),
    "unsupported file": ("txt", "some text", {}, r"unsupported data file type '.txt'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error(case, tmp_path):
    fmt, content, kw, message = BAD[case]
    path = tmp_path / f"e.{fmt}"
    if isinstance(content, str):
        path.write_text(content)
    elif fmt == "csv":
        write_delimited(path, content[0], content[1:], ",")
    else:
        write_jsonl(path, content)
    with pytest.raises(DaptError, match=message) as err:
        load([path], **kw)
    assert "\n" not in str(err.value)


def test_empty_texts_dropped_with_a_count(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [{"text": "ok", "label": 1}, {"text": " ", "label": 0},
                                           {"text": None, "label": 1}, {"text": "fine", "label": 0}])
    texts, labels, report = load([f], empty_texts="drop")
    assert texts == ["ok", "fine"] and labels == [1, 0]
    assert report.dropped_empty == 2 and "dropped 2 empty" in report.notes()[0]
    with pytest.raises(DaptError, match="every text is empty"):
        load([write_jsonl(tmp_path / "all.jsonl", [{"text": "", "label": 1}])], empty_texts="drop")


def test_non_utf8_bytes_error_or_counted_replacement(tmp_path):
    f = tmp_path / "latin.csv"
    f.write_bytes(b"text,label\nfine,1\ncaf\xe9 cr\xe8me \xef\xbf\xbd,0\nna\xefve,1\n")  # one genuine U+FFFD
    with pytest.raises(DaptError, match=r"latin.csv: bytes that are not valid UTF-8 at line 3 .*--encoding_errors replace"):
        load([f])
    texts, _, report = load([f], encoding_errors="replace")
    assert texts[1] == "caf\ufffd cr\ufffdme \ufffd" and report.replaced_bytes == 3
    assert "line 3" in report.first_replacement and "replaced 3 byte sequence(s)" in report.notes()[0]

    tree = make_aclimdb(tmp_path / "aclImdb")
    bad = tree / "train" / "pos" / "2_8.txt"
    bad.write_bytes(b"Lovely \x93film\x94.")
    with pytest.raises(DaptError, match=r"train/pos/2_8.txt: bytes that are not valid UTF-8 at byte 7"):
        load([tree])
    texts, _, report = load([tree], encoding_errors="replace")
    assert "Lovely \ufffdfilm\ufffd." in texts and report.replaced_bytes == 2

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([b"ok", b"bad \xff"], pa.binary()), "label": [0, 1]}), tmp_path / "b.parquet")
    with pytest.raises(DaptError, match=r"b.parquet row 1: bytes that are not valid UTF-8"):
        load([tmp_path / "b.parquet"])
    assert load([tmp_path / "b.parquet"], encoding_errors="replace")[0] == ["ok", "bad \ufffd"]


def test_real_imdb_parquet():
    if not (SHARED_IMDB / "train.parquet").exists():
        pytest.skip("../shared/data/imdb not present")
    texts, labels, report = load([SHARED_IMDB / "train.parquet"])
    assert len(texts) == 25000 and sum(labels) == 12500 and report.rows_read == 25000


def test_real_cp1252_text_is_refused_or_counted(tmp_path):
    """Rotten Tomatoes snippets are Windows-1252: invalid UTF-8 in places."""
    if not (SHARED / "mr" / "rt-polarity.pos").exists():
        pytest.skip("../shared/data/mr not present")
    lines = [(line, y) for y, name in ((1, "pos"), (0, "neg"))
             for line in (SHARED / "mr" / f"rt-polarity.{name}").read_bytes().split(b"\n") if line.strip()]
    f = tmp_path / "mr.tsv"
    f.write_bytes(b"text\tlabel\n" + b"".join(line + b"\t" + str(y).encode() + b"\n" for line, y in lines))
    with pytest.raises(DaptError, match=r"mr.tsv: bytes that are not valid UTF-8 at line \d+"):
        load([f])
    texts, labels, report = load([f], encoding_errors="replace", empty_texts="drop")
    expected = sum(line.decode("utf-8", "replace").count("\ufffd") for line, _ in lines)
    assert expected > 0 and report.replaced_bytes == expected
    assert len(texts) + report.dropped_empty == len(lines) == 10662 and sum(labels) <= 5331


def test_real_tsv_with_unbalanced_quotes(tmp_path):
    """uci-sentences: about 40 sentences hold an unbalanced '"'; standard quoting would read 749 rows."""
    src = SHARED / "uci-sentences" / "imdb_labelled.txt"
    if not src.exists():
        pytest.skip("../shared/data/uci-sentences not present")
    f = tmp_path / "uci.tsv"
    f.write_bytes(b"text\tlabel\n" + src.read_bytes())
    texts, labels, _ = load([f])
    assert len(texts) == 1000 and sum(labels) == 500


@pytest.fixture
def small_chunks(monkeypatch):
    """Stream in chunks of 3 rows, so a few rows cross several chunks."""
    import dapt.data.sources as sources

    monkeypatch.setattr(sources, "CHUNK_ROWS", 3)


def write_parquet(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=4)
    return path


def test_parquet_streamed_in_chunks_checks_every_row(small_chunks, tmp_path):
    """Errors, drops and row positions are the same whatever the chunking: counted over all rows."""
    texts = [f"review {i}" for i in range(10)]
    labels = [i % 2 for i in range(10)]
    f = write_parquet(tmp_path / "a.parquet", text=texts, label=labels, id=list(range(100, 110)))
    cfg = FinetuneConfig(output_dir="x", data_files=[str(f)])
    ds, report = load_source(cfg, 0, "label")
    assert list(ds["text"]) == texts and list(ds["label"]) == labels and list(ds["id"]) == list(range(100, 110))
    assert report.rows_read == report.rows == 10

    bad = texts[:4] + [" ", None] + texts[6:9] + ["<br />"]
    g = write_parquet(tmp_path / "b.parquet", text=bad, label=labels)
    with pytest.raises(DaptError, match=r"3 empty or non-text value\(s\) in column 'text' \(first at row 4;"):
        load([g])
    texts_kept, labels_kept, report = load([g], empty_texts="drop")
    assert texts_kept == texts[:4] + texts[6:9] and labels_kept == labels[:4] + labels[6:9]
    assert report.dropped_empty == 3 and report.rows == 7 and report.rows_read == 10
    cfg = FinetuneConfig(output_dir="x", data_files=[str(g)], empty_texts="drop")
    assert list(load_source(cfg, 0, "label")[0]["row"]) == [0, 1, 2, 3, 6, 7, 8]

    h = write_parquet(tmp_path / "c.parquet", text=texts, label=[0, 1, 0, 1, 0, 1, 0, 7, 0, 9])
    with pytest.raises(DaptError, match=r"2 label\(s\) outside \{0, 1\}.*first at row 7: 7;"):
        load([h])
    # several files: positions name the file and its own row
    with pytest.raises(DaptError, match=r"2 label\(s\) outside \{0, 1\}.*first at .*c.parquet row 7: 7;"):
        load([f, h])
    import pyarrow as pa

    raw = write_parquet(tmp_path / "d.parquet", text=pa.array([b"ok"] * 4 + [b"bad \xff"], pa.binary()), label=[0] * 5)
    with pytest.raises(DaptError, match=r"d.parquet row 4: bytes that are not valid UTF-8"):
        load([raw])
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": t, "label": 1} for t in texts] + [{"text": "x", "label": "neg"}])
    with pytest.raises(DaptError, match=r"mixes types: number at row 0 \(1\) and text at row 10 \('neg'\)"):
        load([mixed])


def test_ids_become_text_when_a_later_chunk_has_text_ids(small_chunks, tmp_path):
    """One type per id column: int ids already written are rewritten as text when a text id follows."""
    a = write_parquet(tmp_path / "a.parquet", text=[f"r{i}" for i in range(7)], label=[0] * 7, id=list(range(7)))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 1, "id": "x-1"}, {"text": "y", "label": 0}])
    cfg = FinetuneConfig(output_dir="x", data_files=[str(a), str(b)])
    ds, _ = load_source(cfg, 0, "label")
    assert list(ds["id"]) == [str(i) for i in range(7)] + ["x-1", None]
    assert list(ds["text"]) == [f"r{i}" for i in range(7)] + ["x", "y"] and list(ds["label"]) == [0] * 7 + [1, 0]
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "z", "label": 1, "id": 5}])
    cfg = FinetuneConfig(output_dir="x", data_files=[str(a), str(c)])
    assert list(load_source(cfg, 0, "label")[0]["id"]) == [*range(7), 5]  # ints stay ints
