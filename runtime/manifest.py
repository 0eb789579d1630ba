"""The artifact contract between exporter (host) and engines (device): `manifest.json`.

The exporter writes one manifest per artifact folder, and beside it `manifest.sha256`, the
manifest's own sha256 (in `sha256sum` format). The runtime checks that digest first, then
the manifest's schema (`manifest_schema`), then every listed file against its sha256, before
any file is used; only then does it build an engine. An edited manifest (an emptied `files`
table, a flipped `trainable`) is refused by name instead of switching its own checks off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from .errors import ArtifactError
from .manifest_schema import check_manifest_dict

MANIFEST_NAME = "manifest.json"
DIGEST_NAME = "manifest.sha256"  # "<sha256 of manifest.json>  manifest.json", as `sha256sum` writes it
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
    def from_dict(cls, d, where: str = "manifest") -> Manifest:
        """The manifest of a parsed `manifest.json`, after checking its whole schema.

        Raises:
            ArtifactError: naming `where`, the field, the value found and what is accepted.
        """
        version = d.get("format_version") if isinstance(d, dict) else None
        if isinstance(d, dict) and version != FORMAT_VERSION:
            raise ArtifactError(f"manifest {where}: format_version {version!r} is not supported; "
                                f"accepted: {FORMAT_VERSION} (export the artifacts again)")
        check_manifest_dict(d, where)
        fields = dict(d)
        fields["parameters"] = tuple(TensorSpec(**p) for p in d["parameters"])
        fields["buffers"] = tuple(TensorSpec(**b) for b in d["buffers"])
        fields["files"] = {k: FileEntry(**v) for k, v in d["files"].items()}
        return cls(**fields)

    def write(self, folder: str | Path) -> Path:
        """Write `manifest.json` and its digest `manifest.sha256` into `folder`; returns the manifest's path."""
        path = Path(folder) / MANIFEST_NAME
        data = json.dumps(self.to_dict(), indent=2, sort_keys=False).encode()
        path.write_bytes(data)
        (Path(folder) / DIGEST_NAME).write_text(f"{hashlib.sha256(data).hexdigest()}  {MANIFEST_NAME}\n")
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


def _check_digest(folder: Path, data: bytes) -> None:
    """Compare `manifest.json`'s bytes with `manifest.sha256` beside it."""
    digest_path = folder / DIGEST_NAME
    manifest_path = folder / MANIFEST_NAME
    if not digest_path.is_file():
        raise ArtifactError(f"no {DIGEST_NAME} beside {str(manifest_path)!r} (the manifest's own sha256; folders "
                            f"exported by an older edgecl lack it): export the artifacts again")
    try:
        recorded, name = digest_path.read_text().split()
    except (UnicodeDecodeError, ValueError):
        recorded, name = "", ""
    if name != MANIFEST_NAME or not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise ArtifactError(f"{str(digest_path)!r} is malformed; accepted: one line '<64 hex digits>  "
                            f"{MANIFEST_NAME}': export the artifacts again")
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise ArtifactError(f"{str(manifest_path)!r} has sha256 {actual[:16]}..., {DIGEST_NAME} expects "
                            f"{recorded[:16]}...: the manifest was edited or damaged; export the artifacts again")


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read `manifest.json` from an artifact folder, after checking its own sha256, and check every file it lists.

    Args:
        verify: also check every listed file's sha256 (False: the manifest alone, e.g. to read its
            layer table).
    Raises:
        ArtifactError: the folder, the manifest or its digest is missing, the manifest was edited
            (its sha256 differs from `manifest.sha256`) or breaks the schema, a listed file is
            missing, or its sha256 differs from the one recorded at export time.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_NAME} in {str(folder)!r}; export artifacts there with edgecl.exporters.export")
    data = path.read_bytes()
    _check_digest(folder, data)
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(path)!r} is not valid JSON: {e}") from e
    manifest = Manifest.from_dict(raw, repr(str(path)))
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
