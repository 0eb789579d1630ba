"""ONNX Runtime sessions configured for steady, measurable on-device training."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ArtifactError


def import_onnxruntime():
    """Import onnxruntime without letting its build check load torch; return the module.

    `import onnxruntime` from onnxruntime-training-cpu 1.19.2 first tries
    `from onnxruntime.training.ortmodule import ORTModule` (to look for a CUDA build), and
    that imports torch whenever torch is installed: on this host it cost 6 s and 250 MB
    (VmHWM 290 MB against 44 MB) in a process that never uses torch, and with torch 2.13
    the import then fails anyway (ImportError, which onnxruntime catches: "no ORTModule").
    Marking that one module absent while onnxruntime loads gives the same outcome without
    loading torch; the mark is removed at once, so a later explicit import behaves as usual.
    Stock onnxruntime has no such check and is not affected.
    """
    probe = "onnxruntime.training.ortmodule"
    if "onnxruntime" in sys.modules or probe in sys.modules:
        import onnxruntime

        return onnxruntime
    sys.modules[probe] = None  # importing it now raises ImportError without running any code
    try:
        import onnxruntime
    finally:
        if probe in sys.modules and sys.modules[probe] is None:
            del sys.modules[probe]
    return onnxruntime


ort = import_onnxruntime()


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
