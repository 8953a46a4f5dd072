"""lnsr_fast.data: reading CSV/TSV/JSON(L) tables (encodings, byte-order marks, malformed rows and quotes, errors
with the file and line), labels (missing ones refused or dropped), splits and metrics."""
import json

import numpy as np
import pytest

from lnsr_fast import data


def table(tmp_path, name, content, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode(encoding))
    return str(path)


def test_read_table_and_check_columns(tmp_path):
    t = data.read_table(table(tmp_path, "a.tsv", "text\tlabel\nhello\tx\n\nbye\ty\n"))
    assert t.rows == [{"text": "hello", "label": "x"}, {"text": "bye", "label": "y"}] and t.lines == [2, 4]
    t = data.read_table(table(tmp_path, "a.json", json.dumps([{"text": "hi", "label": 1}, {"text": None, "label": 2}])))
    assert t.rows[0] == {"text": "hi", "label": 1} and t.lines is None
    with pytest.raises(ValueError, match="'label_x'.*its columns are \\['text', 'label'\\]"):
        data.check_columns(t, {"--label-column": "label_x"})
    with pytest.raises(ValueError, match="missing or null in record 2 of"):
        data.check_columns(t, {"--text-column": "text"})
    with pytest.raises(ValueError, match="empty"):
        data.read_table(table(tmp_path, "empty.csv", ""))
    with pytest.raises(ValueError, match="holds no rows"):
        data.read_table(table(tmp_path, "header.csv", "text,label\n"))
    with pytest.raises(ValueError, match="line 1 names the columns \\['a'\\] more than once"):
        data.read_table(table(tmp_path, "twice.csv", "a,b,a\n1,2,3\n"))


@pytest.mark.parametrize("label", ["", "  ", "NaN", "nan", "null", "NULL", "<NA>", "#N/A"])
def test_missing_and_nan_labels_are_errors_naming_the_file_and_lines(tmp_path, label):
    """They used to become classes (labels ['', 'NaN', 'neg', 'pos'])."""
    path = table(tmp_path, "d.csv", f"text,label\na,pos\nb,{label}\nc,neg\nd,{label}\n")
    t = data.read_table(path)
    with pytest.raises(ValueError, match=rf"column 'label' of '{path}' has no label in lines 3, 5 .*--drop-missing-labels"):
        data.labelled_examples(t, "text", "label")
    texts, pairs, labels, dropped = data.labelled_examples(t, "text", "label", drop_missing_labels=True)
    assert texts == ["a", "c"] and labels == ["pos", "neg"] and pairs is None and t.where(dropped) == "lines 3, 5"


def test_null_missing_and_nan_labels_of_json_lines(tmp_path):
    path = table(tmp_path, "d.jsonl", '{"t": "a", "l": "x"}\n\n{"t": "b", "l": null}\n{"t": "c", "l": NaN}\n'
                                      '{"t": "d", "l": "y"}\n{"t": "e"}\n')
    t = data.read_table(path)
    with pytest.raises(ValueError, match="has no label in lines 3, 4, 6 "):
        data.labelled_examples(t, "t", "l")
    assert data.labelled_examples(t, "t", "l", drop_missing_labels=True)[2] == ["x", "y"]
    with pytest.raises(ValueError, match="column 't' \\(given by --text-column\\) is missing or null in line 2"):
        data.labelled_examples(data.read_table(table(tmp_path, "e.jsonl", '{"t": "a", "l": 1}\n{"l": 2}\n')), "t", "l")


@pytest.mark.parametrize("content, match", [
    # the quote opened on line 2 closes in line 4's text: the rows between are merged into one text field
    ('text,label\n"great movie,pos\nawful,neg\nfine",pos\nok,neg\n',
     r"line 2 of '.*': column 'text' runs over several lines and holds what reads as a whole row \('great movie,pos'\)"),
    # ... in the label: a label spanning lines
    ('text,label\ngreat,"pos\nawful,neg\nfine"\nok,neg\n', r"labels that span lines at line 2"),
    # ... leaving a row with too many fields
    ('id,text,label\n1,"great,pos\n2,awful",neg,x\n3,ok,neg\n',
     r"line 2 has 4 fields but the header has 3 \(the row runs to line 3: a quote left open merges rows\)"),
    # never closed
    ('text,label\ngreat,pos\n"awful,neg\nok,neg\n', r"line 3 is not valid CSV: unexpected end of data \(a quote opened"),
    # text after a closing quote
    ('text,label\n"great" movie,pos\n', r"line 2 is not valid CSV"),
    ('text,label\ngreat\n', r"line 2 has 1 fields but the header has 2$")])
def test_rows_merged_by_a_stray_quote_are_reported_with_line_numbers(tmp_path, content, match):
    path = table(tmp_path, "d.csv", content)
    with pytest.raises(ValueError, match=match):
        data.labelled_examples(data.read_table(path), "text", "label")


def test_multi_line_texts_that_are_no_rows_are_fine(tmp_path):
    path = table(tmp_path, "d.csv", 'text,label\n"first line,\nsecond line",pos\nok,neg\n')
    texts, _, labels, _ = data.labelled_examples(data.read_table(path), "text", "label")
    assert texts == ["first line,\nsecond line", "ok"] and labels == ["pos", "neg"]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_byte_order_marks_are_honoured_and_stripped(tmp_path, encoding):
    """A BOM showed up as a column named '\\ufefftext'; UTF-16 was told to try latin-1."""
    text = "text,label\ncafé,pos\n"
    raw = text.encode(encoding)
    if encoding == "utf-16-be":
        raw = b"\xfe\xff" + raw
    t = data.read_table(table(tmp_path, "d.csv", raw))
    assert t.rows == [{"text": "café", "label": "pos"}]


def test_utf16_without_a_byte_order_mark_gets_the_right_hint(tmp_path):
    path = table(tmp_path, "d.csv", "text,label\ncafé,pos\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match="UTF-16 or UTF-32 without a byte-order mark\\? pass --encoding utf-16-le"):
        data.read_table(path)
    assert data.read_table(path, encoding="utf-16-le").rows == [{"text": "café", "label": "pos"}]
    with pytest.raises(ValueError, match="cannot decode .* as utf-8 .*latin-1"):
        data.read_table(table(tmp_path, "l.csv", "text,label\ncafé,pos\n".encode("latin-1")))
    with pytest.raises(ValueError, match="unknown --encoding 'utf-9'"):
        data.read_table(path, encoding="utf-9")


def test_json_lines_errors_count_lines_not_records(tmp_path):
    path = table(tmp_path, "d.jsonl", '{"t": "a"}\n\n\n[1]\n')
    with pytest.raises(ValueError, match="line 4 is a JSON list, expected an object"):
        data.read_table(path)
    path = table(tmp_path, "e.jsonl", '{"t": "a"}\n\n{"t": \n')
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        data.read_table(path)
    with pytest.raises(ValueError, match="record 2 is a int"):
        data.read_table(table(tmp_path, "f.json", "[{}, 3]"))


def test_labels_and_metrics():
    assert data.label_vocabulary(["b", "a", "b"]) == ["a", "b"]
    assert data.label_vocabulary([10, 2, 1]) == ["1", "2", "10"]   # integers sort numerically
    m = data.classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0])
    assert m["accuracy"] == pytest.approx(0.6)
    # F1: class 0: 2·1/(2+1+1)=0.5; class 1: 2·2/(4+1+0)=0.8; class 2: 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_stratified_split_keeps_class_shares():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    idx = data.stratified_split(labels, 20, np.random.default_rng(0))
    assert len(set(idx)) == 20 and [labels[i] for i in idx].count("a") == 12
    rest = data.stratified_split(labels, 10, np.random.default_rng(0), exclude=idx)
    assert not set(rest) & set(idx)
    with pytest.raises(ValueError, match="only 100"):
        data.stratified_split(labels, 101, np.random.default_rng(0))
