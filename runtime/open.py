"""`open_engine`: an artifact folder -> the engine its manifest names."""

from __future__ import annotations

from pathlib import Path

from .engine import Engine
from .errors import ArtifactError
from .manifest import load_manifest
from .optim import OptimizerConfig


def open_engine(artifact_dir: str | Path, optimizer: OptimizerConfig = OptimizerConfig(),
                threads: int | None = None, state: str | Path | None = None) -> Engine:
    """Open the engine named in `artifact_dir/manifest.json`, after checking every file's sha256.

    Args:
        artifact_dir: a folder written by `edgecl.exporters.export`.
        optimizer: optimizer and hyper-parameters for training.
        threads: ONNX Runtime intra-op threads (None: ORT's default).
        state: optional file written by `Engine.save` to resume from.
    Raises:
        ArtifactError: missing folder or file, altered file, unknown engine.
    """
    manifest = load_manifest(artifact_dir)
    if manifest.engine == "portable":
        from .portable import PortableEngine as cls
    elif manifest.engine == "ort-training":
        from .ort_training import OrtTrainingEngine as cls
    else:
        raise ArtifactError(f"engine {manifest.engine!r} has no on-device runtime; accepted: portable, ort-training")
    engine = cls(Path(artifact_dir), manifest, optimizer, threads=threads)
    if state is not None:
        engine.load(state)
    return engine
