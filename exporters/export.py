"""`export`: a torch model -> an artifact folder a device can train from.

The folder always holds `manifest.json` and its digest `manifest.sha256`,
`init_state.npz` (initial parameters, masks and BatchNorm buffers by name),
`model.onnx` (an inference model stock onnxruntime runs) and the engine's training
graphs. It is written beside the output folder and moved into place whole
(`out_folder`), by one export at a time (`edgecl.runtime.locks`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgecl.runtime.locks import folder_lock
from edgecl.runtime.manifest import Manifest, file_entries, load_manifest

from .layers import activation_bytes_per_sample, layer_table
from .onnx_files import IR_VERSION, OPSET, save_onnx
from .ort_training import write_ort_training
from .out_folder import check_out_dir, discard, make_temp_folder, move_into_place
from .portable import write_portable
from .quiet import quiet_onnx_export
from .channel_plan import plan_channels
from .latent import PREFIX_FILE, split_model, write_prefix
from .spec import check_logits, check_ops, check_supported, resolve_masks, resolve_trainable, tensor_specs
from .structured import write_structured


@dataclasses.dataclass(frozen=True)
class ArtifactSet:
    """The result of `export`: where the artifacts are and what they hold."""

    folder: Path
    manifest: Manifest

    @property
    def paths(self) -> dict[str, Path]:
        return {name: self.folder / name for name in self.manifest.files}

    @property
    def sha256(self) -> dict[str, str]:
        return {name: e.sha256 for name, e in self.manifest.files.items()}


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime-training-cpu", "onnxruntime", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def source_fingerprint(folders, versions: dict[str, str]) -> str:
    """12 hex digits of a sha256 over the `*.py` files under `folders` (paths and bytes) and `versions`."""
    digest = hashlib.sha256()
    for k, folder in enumerate(Path(f) for f in folders):
        for path in sorted(folder.rglob("*.py")):
            name = f"{k}/{path.relative_to(folder).as_posix()}"
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps(versions, sort_keys=True).encode())
    return digest.hexdigest()[:12]


@functools.cache
def exporter_fingerprint() -> str:
    """What decides the graphs besides the model: the source of this package and of `edgecl.runtime`
    (the manifest format, the optimizer defaults the ort-training graphs bake in), and the host's
    package versions.

    Recorded in every manifest (`versions["edgecl.exporters"]`). Two exports of the same model,
    input and initial weights are the same artifacts only when it matches, so an export cache
    keyed on it (`bench run`) never serves the graphs of an older exporter.
    """
    from edgecl.runtime import manifest

    return source_fingerprint([Path(__file__).parent, Path(manifest.__file__).parent], _versions())


def export_inference(model: nn.Module, example_input: torch.Tensor, path: Path, opset: int = OPSET) -> None:
    """Export `model` in eval mode to a self-contained ONNX inference model (dynamic batch)."""
    model = model.eval()
    with quiet_onnx_export():
        torch.onnx.export(model, (example_input,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}}, opset_version=opset, dynamo=False)
    save_onnx(onnx.load(str(path)), path)


def export(model: nn.Module, example_input: torch.Tensor, out_dir, engine: str = "portable", masks=None,
           trainable=None, dropout: bool = False, opset: int = OPSET, overwrite: bool = True,
           structure: str | None = None, split: str | None = None) -> ArtifactSet:
    """Export a torch model to training artifacts for one engine.

    Args:
        model: a torch model made of supported layers (README); it is not modified.
        example_input: float32 tensor (N, *input_shape); N is dynamic in every graph.
        out_dir: folder to write: new, empty, or an earlier export (replaced whole once every file
            is written, in a temporary folder beside it); anything else in it is refused, never deleted.
        engine: "portable" (standard-ONNX step graph, any ONNX Runtime) or "ort-training".
        masks: None, "weights" (all Conv2d/Linear weights), parameter names, or name -> 0/1 array.
            Masked weights enter the graphs as weight * mask; masks can be replaced at run time.
        trainable: names of parameters that train (None: all); the others are frozen and
            get no gradient output.
        dropout: keep Dropout active in the training graph (off by default).
        opset: ONNX opset of the graphs (<= 21).
        structure: None, or "channel" (portable engine only): the graphs take the active output
            channels of each channel set as int64 inputs and compute on the narrower tensors
            (`edgecl.exporters.structured`); the engine sets them with `set_channels`.
        split: None, or a split point (`edgecl.exporters.latent.split_points`; portable engine, no
            structure): latent replay. The folder then holds the graphs of the model's part after the
            point, whose input is the latent (manifest input_shape), and `prefix.onnx`, the part up
            to it in inference mode; masks and trainable name the suffix's parameters; manifest
            extra["latent"] records the point, the model's input and latent shapes and the prefix's
            parameters (their initial values in init_state.npz as prefix::param::<name>).
    Returns:
        ArtifactSet with the folder and its manifest (files and their sha256).
    Raises:
        UnsupportedModelError: an unsupported layer or op, or outputs that are not (N, classes) logits,
            before any file is written.
        ValueError / KeyError: bad engine, example input, masks or trainable names; an output folder
            that is a file, holds what no export wrote, or holds the working folder.
        FolderBusyError: another export is writing the same output folder.
    """
    if engine not in ("portable", "ort-training"):
        raise ValueError(f"engine={engine!r}; accepted: 'portable', 'ort-training'")
    if not isinstance(example_input, torch.Tensor) or example_input.dtype != torch.float32 or example_input.ndim < 2:
        raise ValueError("example_input must be a float32 torch.Tensor of shape (N, *input_shape)")
    if min(example_input.shape) < 1:
        raise ValueError(f"example_input has shape {tuple(example_input.shape)}; accepted: (N, *input_shape) with "
                         "every dimension >= 1")
    if not 13 <= opset <= 21:
        raise ValueError(f"opset={opset}; accepted: 13..21")
    if structure not in (None, "channel"):
        raise ValueError(f"structure={structure!r}; accepted: None, 'channel'")
    if structure is not None and engine != "portable":
        raise ValueError(f"structure={structure!r} with engine={engine!r}; accepted: structure='channel' with "
                         "engine='portable' (onnxruntime-training 1.19.2's AdamW graph moves the weights and moments "
                         "of inactive channels, and its MaxPoolGrad needs static channel counts: README)")
    if split is not None and (engine != "portable" or structure is not None):
        raise ValueError(f"split={split!r} with engine={engine!r}, structure={structure!r}; accepted: split with "
                         "engine='portable' and structure=None")
    target = check_out_dir(out_dir, overwrite)  # before any work: a refused folder costs nothing
    check_supported(model)
    prefix = None
    if split is not None:
        prefix, model = split_model(model, split)  # a point it cannot split is refused here
        with torch.no_grad():
            latent_input = prefix.eval()(example_input)
        full_input, example_input = example_input, latent_input
    model = _copy_for_export(model)
    check_ops(_copy_for_export(model), example_input)  # a copy: a training forward moves BN statistics
    num_classes = check_logits(model, example_input)
    if structure == "channel":
        plan_channels(model, example_input)  # a model it cannot follow is refused before any file is written
    mask_arrays = resolve_masks(model, masks)
    trainable_names = resolve_trainable(model, trainable)
    params, buffers = tensor_specs(model, mask_arrays, trainable_names)
    model.train()

    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target, what="output folder"):  # a second export into the same folder is refused at once
        target = check_out_dir(out_dir, overwrite)  # again, now that no other export can change it
        tmp = make_temp_folder(target)
        try:
            writer = write_structured if structure == "channel" else \
                write_portable if engine == "portable" else write_ort_training
            files, extra = writer(model, example_input, tmp, params, buffers, mask_arrays, opset=opset, dropout=dropout)
            # for FLOPs counting and the memory budget on the device, which has no torch
            extra = {**extra, "layers": layer_table(model, example_input),
                     "activation_bytes_per_sample": activation_bytes_per_sample(model, example_input)}
            export_inference(_copy_for_export(model), example_input, tmp / "model.onnx", opset)
            state = {f"param::{n}": p.detach().numpy() for n, p in model.named_parameters()}
            if prefix is not None:
                latent, prefix_state = write_prefix(prefix, full_input, tmp, opset)
                extra["latent"] = {"split": split, **latent, "prefix_layers": layer_table(prefix.eval(), full_input)}
                state.update(prefix_state)
                files = [*files, PREFIX_FILE]
            state.update({f"mask::{n}": m for n, m in mask_arrays.items()})
            state.update({f"buffer::{b.name}": dict(model.named_buffers())[b.name].detach().numpy() for b in buffers})
            np.savez(tmp / "init_state.npz", **state)
            names = sorted(set(files) | {"model.onnx", "init_state.npz"})
            manifest = Manifest(engine=engine, input_shape=tuple(example_input.shape[1:]), num_classes=num_classes,
                                parameters=params, buffers=buffers, files=file_entries(tmp, names), opset=opset,
                                ir_version=IR_VERSION,
                                versions={**_versions(), "edgecl.exporters": exporter_fingerprint()},
                                model_name=type(model).__name__, extra=extra)
            manifest.write(tmp)
            load_manifest(tmp)  # round-trip check before the folder goes live
            move_into_place(tmp, target)
        except BaseException:
            discard(tmp)
            raise
        return ArtifactSet(Path(out_dir), load_manifest(target))


def _copy_for_export(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
