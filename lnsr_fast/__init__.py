"""lnsr_fast: Layerwise Noise Stability Regularization for fine-tuning Hugging Face transformers.

    import lnsr_fast as lf
    noise = lf.InManifoldNoise(model.get_input_embeddings(), k=10, ratio=0.1, seed=0)
    lnsr = lf.LNSR(model, noise, weight=0.02)
    outputs, reg = lnsr(**batch)
    (outputs.loss + reg).backward()
"""
from .lnsr import LNSR
from .neighbors import build_neighbor_table
from .noise import GaussianNoise, InManifoldNoise
from .stability import layerwise_stability

__version__ = "0.1.0"
__all__ = ["LNSR", "GaussianNoise", "InManifoldNoise", "build_neighbor_table", "layerwise_stability",
           "LNSRConfig", "LNSRTrainer", "methods"]


def __getattr__(name):
    # The trainer imports transformers' Trainer (slow); load it, and the peer methods, only when asked for.
    if name in ("LNSRConfig", "LNSRTrainer"):
        from . import trainer
        return getattr(trainer, name)
    if name == "methods":
        import importlib
        return importlib.import_module(".methods", __name__)
    raise AttributeError(f"module 'lnsr_fast' has no attribute {name!r}")
