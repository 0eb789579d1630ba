"""Writing ONNX files that every supported ONNX Runtime reads: the opset and IR version of the graphs.

Shared by `export` (the inference model) and the engine writers (`portable`, `ort_training`);
it imports nothing of theirs, so the exporter's modules import one another one way only.
"""

from __future__ import annotations

from pathlib import Path

import onnx

OPSET = 18  # <= 21: ONNX Runtime 1.19 (last training release) and the newest both run it
IR_VERSION = 10  # ORT 1.19.2 refuses IR 11+ (written by onnx >= 1.18)


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Write an ONNX model at the IR version every supported ORT reads."""
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.save(model, str(path))
