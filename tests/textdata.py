"""Tiny text-classification data and a tiny saved BERT for the command-line and experiment tests: two
classes told apart by a few words, so that a 2-layer model learns them in a few steps."""
import csv
import inspect

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = "good great fine nice love bad awful poor hate boring movie plot actor film the a was is very not".split()
POSITIVE, NEGATIVE = WORDS[:5], WORDS[5:10]


def _tokenizer(vocab_path):
    # transformers 5 takes the vocabulary as `vocab=`; 4.x as `vocab_file=`
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        return BertTokenizerFast(vocab=str(vocab_path))
    return BertTokenizerFast(vocab_file=str(vocab_path))


def save_tiny_model(root):
    """A tiny random BERT and a WordPiece tokenizer over WORDS, saved as a model folder."""
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = _tokenizer(vocab)
    assert tokenizer("good movie")["input_ids"][1:3] == [5, 15]   # the vocabulary is really in use
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    path = root / "model"
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def sentences(n, seed=0):
    """n (text, label) pairs, alternating pos and neg."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["pos", "neg"][i % 2]
        words = list(rng.choice(POSITIVE if label == "pos" else NEGATIVE, 2)) + list(rng.choice(WORDS[10:], 3))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path, n=40):
    """n sentences as a CSV with columns id, sentence, sentiment (pos/neg)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentence", "sentiment"])
        for i, (text, label) in enumerate(sentences(n)):
            w.writerow([i, text, label])
    return str(path)


