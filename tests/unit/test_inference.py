"""Batched inference: fixed-size padded batches, and bfloat16 serving that agrees with float32."""

from __future__ import annotations

import numpy as np
import pytest

from core.inference import cpu_has_bf16, padded_batches, predict_proba, with_precision
from trainer.arch import build_model


def test_padded_batches_are_all_full_size() -> None:
    images = np.ones((10, 4, 4, 3), dtype=np.uint8)
    batches = list(padded_batches(images, 4))
    assert [b.shape[0] for b, _ in batches] == [4, 4, 4]
    assert [n for _, n in batches] == [4, 4, 2]
    assert not batches[-1][0][2:].any()  # the padding is zeros, not stale cells


def test_bfloat16_serving_agrees_with_float32() -> None:
    model = build_model("tiny", 32, seed=0)
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    fp32 = predict_proba(model, x, 8)
    converted = with_precision(model, "bfloat16")
    if not cpu_has_bf16():
        assert converted is model
        pytest.skip("this CPU has no native bfloat16; allscore keeps float32 here")
    assert converted is not model
    assert any("bfloat16" in str(layer.dtype_policy) for layer in converted.layers)
    assert converted.layers[-1].dtype_policy.name == "float32"
    np.testing.assert_allclose(predict_proba(converted, x, 8), fp32, atol=0.02)
