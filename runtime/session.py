"""ONNX Runtime sessions configured for steady, measurable on-device training."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .errors import ArtifactError


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options: `threads` intra-op threads, no spinning (stable timings, idle cores)."""
    opts = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads}; accepted: >= 1 or None")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def make_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the CPU for one artifact graph.

    Raises:
        ArtifactError: the file is not a model this ONNX Runtime can load.
    """
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise ArtifactError(f"onnxruntime {ort.__version__} cannot load {str(path)!r}: {e}") from e
