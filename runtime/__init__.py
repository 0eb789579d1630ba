"""edgecl.runtime: the on-device side. Imports only numpy and onnxruntime, never torch."""

from .engine import Batch, Engine
from .errors import ArtifactError, BatchError, EdgeclError, UnsupportedModelError
from .manifest import Manifest, TensorSpec, load_manifest
from .optim import OptimizerConfig, OptimizerKind
from .open import open_engine

__all__ = [
    "ArtifactError", "Batch", "BatchError", "EdgeclError", "Engine", "Manifest", "OptimizerConfig",
    "OptimizerKind", "TensorSpec", "UnsupportedModelError", "load_manifest", "open_engine",
]
