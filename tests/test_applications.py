"""tfbn on the models people train: ResNet50, MobileNetV2, EfficientNetB0 (keras.applications).

The architectures ship with keras (`weights=None`: nothing is downloaded), built at 32x32 with 10
classes so that the suite stays fast; the full sizes are in `tfbn bench`. References: the original
Keras model (conversion, folding, export) and float64 NumPy (statistics).
"""

import keras
import numpy as np
import pytest

import tfbn

ARCHITECTURES = ("ResNet50", "MobileNetV2", "EfficientNetB0")
SIZE = 32


def build(name: str, seed: int = 0, dtype: str = "float32"):
    """The architecture with random weights and batch-norm variables far from their initial ones.

    Fresh initial moving statistics (0 and 1) would make inference trivial for several of these
    networks (MobileNetV2's logits are then ~1e-12), hiding any error in the statistics.
    """
    keras.config.set_dtype_policy(dtype)
    try:
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(SIZE, SIZE, 3), classes=10, classifier_activation=None
        )
    finally:
        keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        # The initializers' own draws vary with the dtype: draw again, the same for both.
        variable.assign(rng.normal(0.0, 1.0, variable.shape) * np.std(variable.numpy()))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0.0, 0.5, channels))
    return model


def without_dropout(*models) -> None:
    """Dropout layers (EfficientNetB0's) pass their inputs through in training mode too, so that
    training-mode outputs can be compared across dtypes (their random draws depend on it)."""
    for model in models:
        for layer in model.layers:
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0


def images(n: int, seed: int = 1, dtype="float32") -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, SIZE, SIZE, 3)).astype(dtype)


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _batch_norms(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


# ---------------------------------------------------------------------------------- conversion
@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_converted_model_computes_what_the_original_computes(name, tmp_path):
    model = build(name)
    converted = tfbn.convert(model)
    originals = _batch_norms(model)
    assert len(originals) >= 49
    assert all(type(converted.get_layer(bn.name)) is tfbn.BatchNorm for bn in originals)
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    x = images(8)
    assert _relative(converted(x, training=False), model(x, training=False)) <= 1e-5
    # Training mode in float32: batch statistics over 8 examples of 1x1 feature maps in the last
    # stage amplify rounding differences through ~50 layers (float64 below shows the formulas
    # agree to 1e-5).
    assert _relative(converted(x, training=True), model(x, training=True)) <= 1e-4
    for bn in originals:
        twin = converted.get_layer(bn.name)
        np.testing.assert_allclose(twin.moving_mean, bn.moving_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(twin.moving_variance, bn.moving_variance, rtol=1e-4, atol=1e-5)

    # The converted model saves and reloads without custom_objects.
    path = tmp_path / f"{name}.keras"
    converted.save(path)
    reloaded = keras.saving.load_model(path)
    assert all(type(reloaded.get_layer(bn.name)) is tfbn.BatchNorm for bn in originals)
    np.testing.assert_array_equal(reloaded(x, training=False), converted(x, training=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_converted_model_in_training_mode_is_as_exact_as_the_original(name):
    """Float64 copies agree to 1e-5; in float32 each is as far from float64 as the other.

    In training mode the last stage normalizes 8 values per channel (1x1 maps at 32x32), and
    float32 rounding grows through ~50 layers: Keras's own layer is ~1e-4 from its float64
    result there, so two float32 implementations cannot agree to 1e-5 unless bit-identical.
    """
    model = build(name)
    truth = build(name, dtype="float64")
    converted, converted64 = tfbn.convert(model), tfbn.convert(truth)
    without_dropout(model, truth, converted, converted64)
    assert converted64.get_layer(_batch_norms(truth)[0].name).compute_dtype == "float64"
    x = images(8)
    for training in (False, True):
        reference = truth(x.astype("float64"), training=training)
        assert _relative(converted64(x.astype("float64"), training=training), reference) <= 1e-5
        keras_error = _relative(model(x, training=training), reference)
        tfbn_error = _relative(converted(x, training=training), reference)
        assert tfbn_error <= max(2.0 * keras_error, 1e-5), (training, tfbn_error, keras_error)
