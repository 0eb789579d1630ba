"""The artifact contract between exporter (host) and engines (device): `manifest.json`.

The exporter writes one manifest per artifact folder; the runtime reads it, checks
every listed file against its sha256 before any file is used, and builds an engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from .errors import ArtifactError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# "torch" is the host-only reference engine (edgecl.exporters.reference); it never has artifacts.
ENGINES = ("portable", "ort-training", "torch")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter or buffer of the model, named as in torch's `named_parameters()`.

    `graph_name` is the name of the tensor inside the ONNX graphs (the same as
    `name` unless the exporter had to rename it).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    trainable: bool = True
    masked: bool = False
    graph_name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not self.graph_name:
            object.__setattr__(self, "graph_name", self.name)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an artifact folder holds, written by `edgecl.exporters.export`.

    Attributes:
        engine: "portable" or "ort-training".
        input_shape: shape of one sample (no batch dimension), e.g. (1, 8, 8).
        num_classes: width of the logits.
        parameters: every parameter in torch order; `trainable=False` ones are frozen.
        buffers: running statistics (BatchNorm) carried between steps.
        files: file name -> sha256 and size of every artifact file.
        opset: ONNX opset of the graphs; ir_version: their IR version.
        versions: package versions on the host at export time.
        extra: engine-specific details (graph input/output names, optimizer files).
    """

    engine: str
    input_shape: tuple[int, ...]
    num_classes: int
    parameters: tuple[TensorSpec, ...]
    buffers: tuple[TensorSpec, ...] = ()
    files: dict = dataclasses.field(default_factory=dict)
    opset: int = 18
    ir_version: int = 10
    versions: dict = dataclasses.field(default_factory=dict)
    model_name: str = ""
    extra: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ArtifactError(f"manifest engine {self.engine!r} is unknown; accepted: {', '.join(ENGINES)}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "parameters", tuple(self.parameters))
        object.__setattr__(self, "buffers", tuple(self.buffers))

    @property
    def trainable_names(self) -> list[str]:
        return [p.name for p in self.parameters if p.trainable]

    @property
    def masked_names(self) -> list[str]:
        return [p.name for p in self.parameters if p.masked]

    def spec(self, name: str) -> TensorSpec:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["files"] = {k: dataclasses.asdict(v) if isinstance(v, FileEntry) else v for k, v in self.files.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        try:
            version = d.get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise ArtifactError(f"manifest format_version {version} is not supported; accepted: {FORMAT_VERSION}")
            fields = dict(d)
            fields["parameters"] = tuple(TensorSpec(**p) for p in d["parameters"])
            fields["buffers"] = tuple(TensorSpec(**b) for b in d.get("buffers", ()))
            fields["files"] = {k: FileEntry(**v) for k, v in d.get("files", {}).items()}
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"manifest is malformed: {e!r}") from e

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False))
        return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: str | Path, names: list[str]) -> dict[str, FileEntry]:
    folder = Path(folder)
    return {n: FileEntry(sha256_file(folder / n), (folder / n).stat().st_size) for n in names}


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read `manifest.json` from an artifact folder and check every file it lists.

    Raises:
        ArtifactError: the folder or manifest is missing or malformed, a listed file is
            missing, or its sha256 differs from the one recorded at export time.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_NAME} in {str(folder)!r}; export artifacts there with edgecl.exporters.export")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(path)!r} is not valid JSON: {e}") from e
    manifest = Manifest.from_dict(raw)
    if verify:
        for name, entry in manifest.files.items():
            f = folder / name
            if not f.is_file():
                raise ArtifactError(f"artifact file {str(f)!r} listed in the manifest is missing")
            digest = sha256_file(f)
            if digest != entry.sha256:
                raise ArtifactError(
                    f"artifact file {str(f)!r} has sha256 {digest[:16]}..., the manifest expects "
                    f"{entry.sha256[:16]}...: the file was altered or truncated; export again"
                )
    return manifest
