"""The host's export cache of built-in model families: what `edgecl run`, `bench stream` and `bench online` train.

`export_cached` builds a family from a seed and exports it (torch, host side) into
`out_dir/artifacts/<model>-<engine>-<key>`, keyed on the model, its input, classes, seed, engine
and the exporter's fingerprint, and reuses a folder an earlier call left. `export_in_child` does
the same in a new interpreter, so the process that then trains and times (`bench stream`,
`bench online`) never loads torch: it imports numpy and `edgecl.runtime` only, as an app does.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from edgecl.runtime.locks import folder_lock


def export_cached(model: str, input_shape, num_classes: int, seed: int, out_dir, engine: str = "portable",
                  width: int | None = None, structure: str | None = None, split: str | None = None):
    """Export a built-in family with masks on every weight (SparCL's), or reuse the cached export.

    Args:
        model: a name of `edgecl.exporters.MODELS`. input_shape: one sample (C, H, W).
        num_classes: logits width. seed: the initial weights. out_dir: the cache's parent folder.
        engine: "portable" or "ort-training". width: the family's width (None: its default).
        structure: None or "channel" (a channel-structured export). split: a latent-replay split point.
    Returns:
        (the torch model, the artifact folder).
    """
    import torch

    from edgecl.exporters import build_model, export
    from edgecl.exporters.export import exporter_fingerprint

    input_shape = tuple(int(d) for d in input_shape)
    kwargs = {} if width is None else {"width": width}
    net = build_model(model, input_shape, num_classes, seed=seed, **kwargs)
    # the exporter's fingerprint too: after an exporter change (or a new torch/onnx) the cache re-exports
    key = hashlib.sha256(json.dumps([model, input_shape, num_classes, seed, engine, exporter_fingerprint()]
                                    + ([width, structure] if width or structure else [])
                                    + ([split] if split else [])).encode())
    folder = Path(out_dir) / "artifacts" / f"{model}-{engine}-{key.hexdigest()[:10]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    # runs side by side (bench run) wait for the one exporting, then use its artifacts; export's own lock re-enters
    with folder_lock(folder, wait=True, what="artifact cache folder"):
        if not (folder / "manifest.json").exists():
            export(net, torch.zeros(2, *input_shape), folder, engine=engine,
                   masks=None if structure else "weights", structure=structure, split=split)
    return net, folder


def export_in_child(model: str, input_shape, num_classes: int, seeds, out_dir, timeout_s: float = 1800.0) -> dict:
    """`export_cached` of one model for each seed, in a new interpreter (this one never imports torch).

    Returns:
        {seed: artifact folder}.
    Raises:
        RuntimeError: the export failed (the tail of its stderr in the message).
    """
    request = {"model": model, "input_shape": list(input_shape), "num_classes": num_classes,
               "seeds": [int(s) for s in seeds], "out_dir": str(out_dir)}
    argv = [sys.executable, "-m", "edgecl.bench.export_cache", json.dumps(request)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"exporting {model} did not finish within {timeout_s:g} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FOLDERS ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"exporting {model} {tuple(input_shape)} failed with exit code {proc.returncode}: {tail}")
    return {int(seed): Path(path) for seed, path in json.loads(lines[-1][len("FOLDERS "):]).items()}


def main(argv=None) -> int:
    """The child of `export_in_child`: argv[0] is its JSON request; prints `FOLDERS {seed: folder}`."""
    request = json.loads((sys.argv[1:] if argv is None else argv)[0])
    folders = {seed: str(export_cached(request["model"], request["input_shape"], request["num_classes"], seed,
                                       request["out_dir"])[1]) for seed in request["seeds"]}
    print("FOLDERS " + json.dumps(folders), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
