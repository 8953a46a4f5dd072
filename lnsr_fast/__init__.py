"""lnsr_fast: Layerwise Noise Stability Regularization for fine-tuning Hugging Face transformers.

    import lnsr_fast as lf
    handle = lf.apply(model, lf.LNSRConfig(noise="in_manifold", ratio=0.1, k=10, weight=0.01))
    model(**batch).loss.backward()      # in training mode: task loss + LNSR penalty, from the model itself
    handle.last                         # {"task_loss": ..., "lnsr_penalty": ...}
    lf.remove(model)                    # the plain model again
"""
from .lnsr import LNSRConfig
from .neighbors import build_neighbor_table
from .noise import GaussianNoise, InManifoldNoise
from .regularize import Handle, apply, handle_of, remove, with_penalty
from .stability import layerwise_stability

__version__ = "0.1.0"
__all__ = ["apply", "remove", "handle_of", "Handle", "with_penalty", "LNSRConfig", "LNSRCallback", "LNSRTrainer", "GaussianNoise",
           "InManifoldNoise", "build_neighbor_table", "layerwise_stability", "methods"]


def __getattr__(name):
    # The trainer imports transformers' Trainer (slow); load it, and the peer methods, only when asked for.
    if name in ("LNSRCallback", "LNSRTrainer"):
        from . import trainer
        return getattr(trainer, name)
    if name == "methods":
        import importlib
        return importlib.import_module(".methods", __name__)
    raise AttributeError(f"module 'lnsr_fast' has no attribute {name!r}")
