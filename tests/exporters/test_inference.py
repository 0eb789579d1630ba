"""The exported inference model runs on stock onnxruntime and matches torch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.helpers import FAMILIES, rel_err


@pytest.mark.parametrize("name", FAMILIES)
def test_inference_model_matches_torch(exported, name):
    model, folder = exported(name)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    (logits,) = session.run(["logits"], {"x": x})
    assert logits.shape == (5, 10)
    assert rel_err(logits, expected) <= 1e-5
