import os

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels run under the interpreter on the CPU; it is chosen when a kernel module is
    # imported, so this must come first (`import lnsr_fast` never imports them).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is many times faster than several on a shared small machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random BERT for sequence classification and its tokenizer, saved as a model folder."""
    from textdata import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture()
def csv_file(tmp_path):
    """40 labelled sentences (columns id, sentence, sentiment) in a CSV file."""
    from textdata import write_csv
    return write_csv(tmp_path / "train.csv")
