"""edgecl.exporters: host side, torch model -> ONNX training artifacts (needs torch)."""

from .export import ArtifactSet, export
from .models import MODELS, build_model

__all__ = ["ArtifactSet", "export", "build_model", "MODELS"]
