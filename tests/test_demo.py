"""`tfbn demo`: the numbers it shows, recomputed in float64 NumPy, each after a sentence saying
what it is."""

import numpy as np

from tfbn import cli
from tfbn.workflow.demo import EPSILON, MOMENTUM, demo, describe

NAMES = (
    "input", "batch_mean", "batch_variance", "train_output", "train_output_mean",
    "train_output_std", "moving_mean", "moving_variance", "inference_output",
)  # fmt: skip


def test_demo_numbers_follow_the_batch_norm_formulas():
    result = demo(seed=3)
    x = result["input"].astype(np.float64)
    mean, variance = x.mean(axis=0), x.var(axis=0)
    np.testing.assert_allclose(result["batch_mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(result["batch_variance"], variance, rtol=1e-5)
    np.testing.assert_allclose(
        result["train_output"], (x - mean) / np.sqrt(variance + EPSILON), atol=1e-5
    )
    moving_mean = (1 - MOMENTUM) * mean
    moving_variance = MOMENTUM + (1 - MOMENTUM) * variance
    np.testing.assert_allclose(result["moving_mean"], moving_mean, atol=1e-6)
    np.testing.assert_allclose(result["moving_variance"], moving_variance, rtol=1e-5)
    np.testing.assert_allclose(
        result["inference_output"],
        (x - moving_mean) / np.sqrt(moving_variance + EPSILON),
        atol=1e-5,
    )
    # The features are on unrelated scales; after normalization they are alike.
    assert np.ptp(np.log(variance)) > 5
    np.testing.assert_allclose(result["train_output_std"], 1.0, atol=0.01)


def test_cli_explains_each_array_before_it(capsys):
    assert cli.main(["demo", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for name in NAMES:
        assert lines.count(f"{name}:") == 1, name
    # Four paragraphs, each opening with a sentence (not an array) that ends in a full stop.
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) == 4
    for paragraph in paragraphs:
        first = paragraph.splitlines()[0]
        assert first.endswith(".") and len(first.split()) > 8
    assert "Training mode" in text and "Inference mode" in text
    assert text == describe(demo(seed=1)) + "\n"
