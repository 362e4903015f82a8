"""The chapter's LeNet, with tfbn's BatchNorm, Keras's BatchNormalization, or none."""

from __future__ import annotations

import keras

from tfbn.layers.batch_norm import BatchNorm
from tfbn.workflow.config import NORMS, RECIPE


def _norm_layer(norm: str, momentum: float, epsilon: float, name: str):
    if norm == "tfbn":
        return BatchNorm(momentum=momentum, epsilon=epsilon, name=name)
    return keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name=name)


def lenet(
    norm: str = "tfbn",
    *,
    momentum: float = RECIPE.momentum,
    epsilon: float = RECIPE.epsilon,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (28, 28, 1),
    use_bias: bool = True,
) -> keras.Sequential:
    """LeNet-5 as in the chapter, with batch normalization before every sigmoid.

    Conv(6, 5) -> BN -> sigmoid -> AvgPool(2) -> Conv(16, 5) -> BN -> sigmoid -> AvgPool(2) ->
    Flatten -> Dense(120) -> BN -> sigmoid -> Dense(84) -> BN -> sigmoid -> Dense(num_classes).

    Args:
        norm: `"tfbn"` (this package's `BatchNorm`), `"keras"` (`keras.layers.BatchNormalization`
            with the same settings) or `"none"` (plain LeNet, no normalization).
        momentum: Momentum of the moving statistics (the chapter uses 0.9).
        epsilon: Variance epsilon (the chapter uses 1e-5).
        num_classes: Number of output logits.
        input_shape: Shape of one image, channels last.
        use_bias: Whether the conv/dense layers before a BN have a bias. The bias is redundant
            before batch normalization (the mean subtraction removes it); the chapter's exercise.

    Returns:
        An uncompiled `keras.Sequential` that outputs logits.
    """
    if norm not in NORMS:
        raise ValueError(f"Argument `norm` must be one of {NORMS}; received norm={norm!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Argument `momentum` must be in [0, 1); received momentum={momentum}.")
    if epsilon <= 0:
        raise ValueError(f"Argument `epsilon` must be positive; received epsilon={epsilon}.")

    layers: list[keras.layers.Layer] = [keras.Input(shape=input_shape)]
    bias = use_bias or norm == "none"
    blocks = [
        ("conv1", keras.layers.Conv2D(6, 5, use_bias=bias, name="conv1")),
        ("pool1", keras.layers.AveragePooling2D(2, strides=2, name="pool1")),
        ("conv2", keras.layers.Conv2D(16, 5, use_bias=bias, name="conv2")),
        ("pool2", keras.layers.AveragePooling2D(2, strides=2, name="pool2")),
        ("flatten", keras.layers.Flatten(name="flatten")),
        ("dense1", keras.layers.Dense(120, use_bias=bias, name="dense1")),
        ("dense2", keras.layers.Dense(84, use_bias=bias, name="dense2")),
    ]
    for name, layer in blocks:
        layers.append(layer)
        if name.startswith(("conv", "dense")):
            if norm != "none":
                layers.append(_norm_layer(norm, momentum, epsilon, f"{name}_bn"))
            layers.append(keras.layers.Activation("sigmoid", name=f"{name}_sigmoid"))
    layers.append(keras.layers.Dense(num_classes, name="logits"))
    return keras.Sequential(layers, name=f"lenet_{norm}")
