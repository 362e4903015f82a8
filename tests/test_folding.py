"""Folding batch norm into the layer before it, against the fold recomputed in float64 NumPy.

Every producer has a non-zero bias and every batch norm random statistics, gamma and beta, so a
fold that forgets to rescale the bias, scales the wrong kernel axis or mixes up the depthwise
channel order fails here. The models compute in float64, so the folded model must reproduce the
original to float64 rounding.
"""

import keras
import numpy as np
import pytest

import tfbn
from tfbn.tools import folding
from tfbn.tools.folding import FoldStep, fold_batch_norm, fold_plan

# name -> (input shape, producer factory, batch-norm axis)
# TensorFlow's CPU Conv2D has no float64 kernel for channels_first: that case runs in float32, with
# 4 filters on 5x5 outputs (Keras 3.15's `ops.add` adds a (1, C, 1, 1) bias on the last axis when C
# equals the width, so a Conv2D(5) there is wrong before any folding).
PRODUCERS = {
    "conv1d": ((9, 3), lambda: keras.layers.Conv1D(4, 3), -1),
    "conv2d": ((7, 7, 3), lambda: keras.layers.Conv2D(5, 3), -1),
    "conv2d_channels_first": (
        (3, 7, 7),
        lambda: keras.layers.Conv2D(4, 3, data_format="channels_first"),
        1,
    ),
    "conv3d": ((5, 5, 5, 2), lambda: keras.layers.Conv3D(3, 2), -1),
    "conv2d_transpose": ((5, 5, 3), lambda: keras.layers.Conv2DTranspose(4, 3, strides=2), -1),
    "depthwise_conv2d": (
        (7, 7, 3),
        lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
        -1,
    ),
    "depthwise_conv1d": ((9, 3), lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2), -1),
    "separable_conv2d": (
        (7, 7, 3),
        lambda: keras.layers.SeparableConv2D(4, 3, depth_multiplier=2),
        -1,
    ),
    "separable_conv1d": ((9, 3), lambda: keras.layers.SeparableConv1D(4, 3), -1),
    "dense": ((6,), lambda: keras.layers.Dense(5), -1),
    "dense_rank3": ((4, 6), lambda: keras.layers.Dense(5), -1),
}


@pytest.fixture(autouse=True)
def float64(request):
    channels_first = "channels_first" in request.node.name
    keras.config.set_dtype_policy("float32" if channels_first else "float64")
    yield
    keras.config.set_dtype_policy("float32")


def _relative(a, b) -> float:
    """Largest difference relative to the largest value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _model(kind, producer_name, batch_norm_cls, rng):
    shape, make, axis = PRODUCERS[producer_name]
    inputs = keras.Input(shape)
    producer = make()
    x = producer(inputs)
    outputs = batch_norm_cls(axis=axis, epsilon=0.01, name="bn")(x)
    model = keras.Model(inputs, outputs, name=kind)
    for variable in producer.variables:
        variable.assign(rng.normal(0.0, 1.0, variable.shape))  # the bias too: never 0
    bn = model.get_layer("bn")
    channels = bn.moving_mean.shape[0]
    bn.moving_mean.assign(rng.normal(0.0, 2.0, channels))
    bn.moving_variance.assign(rng.uniform(0.05, 3.0, channels))
    bn.gamma.assign(rng.uniform(0.3, 2.0, channels))
    bn.beta.assign(rng.normal(0.0, 1.0, channels))
    return model, producer, bn


def _expected_fold(producer, bn):
    """The folded kernel and bias, one output channel at a time, in float64."""
    mean, variance, gamma, beta = (
        np.asarray(v.numpy(), np.float64)
        for v in (bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta)
    )
    scale = gamma / np.sqrt(variance + bn.epsilon)
    if isinstance(producer, keras.layers.SeparableConv1D | keras.layers.SeparableConv2D):
        name, kernel = "pointwise_kernel", producer.pointwise_kernel.numpy().copy()
    else:
        name, kernel = "kernel", producer.kernel.numpy().copy()
    for channel in range(len(scale)):
        if isinstance(producer, keras.layers.DepthwiseConv1D | keras.layers.DepthwiseConv2D):
            multiplier = kernel.shape[-1]
            kernel[..., channel // multiplier, channel % multiplier] *= scale[channel]
        elif isinstance(producer, keras.layers.Conv2DTranspose):
            kernel[..., channel, :] *= scale[channel]  # kernel (h, w, out, in)
        else:
            kernel[..., channel] *= scale[channel]
    bias = (producer.bias.numpy() - mean) * scale + beta
    return name, kernel, bias


@pytest.mark.parametrize("batch_norm_cls", [keras.layers.BatchNormalization, tfbn.BatchNorm])
@pytest.mark.parametrize("producer_name", sorted(PRODUCERS))
def test_fold_equals_the_float64_formula(producer_name, batch_norm_cls, rng):
    model, producer, bn = _model("m", producer_name, batch_norm_cls, rng)
    assert fold_plan(model) == {"bn": FoldStep(producer.name, "")}
    folded = fold_batch_norm(model)
    assert type(folded.get_layer("bn")) is folding.FoldedAway
    name, kernel, bias = _expected_fold(producer, bn)
    twin = folded.get_layer(producer.name)
    # float64 rounding (float32 for the channels-first conv); tfbn.BatchNorm's own float64
    # inference is ~1e-10 from the exact value, hence 1e-8 for the outputs.
    weights_tolerance, outputs_tolerance = (
        (1e-12, 1e-8) if twin.compute_dtype == "float64" else (1e-6, 1e-5)
    )
    assert _relative(getattr(twin, name).numpy(), kernel) <= weights_tolerance
    assert _relative(twin.bias.numpy(), bias) <= weights_tolerance
    x = rng.normal(0.5, 2.0, (4, *model.input_shape[1:])).astype(twin.compute_dtype)
    assert _relative(folded(x), model(x, training=False)) <= outputs_tolerance


def test_a_producer_without_bias_gets_the_folded_one(rng):
    inputs = keras.Input((6,))
    x = keras.layers.Dense(4, use_bias=False, name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))
    model.get_layer("bn").moving_mean.assign(rng.normal(size=4))
    folded = fold_batch_norm(model)
    assert folded.get_layer("dense").use_bias
    x = rng.normal(size=(3, 6))
    assert _relative(folded(x), model(x)) <= 1e-8


def _unfoldable(rng):
    inputs = keras.Input((6, 6, 3))
    shared = keras.layers.Conv2D(3, 1, name="shared")
    a = keras.layers.BatchNormalization(name="bn_shared_twice")(shared(inputs))
    b = shared(a)
    c = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="conv_relu")(b)
    c = keras.layers.BatchNormalization(name="bn_after_relu")(c)
    d = keras.layers.Conv2D(3, 3, padding="same", name="conv_used_twice")(c)
    e = keras.layers.BatchNormalization(name="bn_beside_add")(d)
    f = keras.layers.Add(name="add")([d, e])
    g = keras.layers.BatchNormalization(name="bn_after_add")(f)
    h = keras.layers.Conv2D(4, 1, name="conv_wrong_axis")(g)
    h = keras.layers.BatchNormalization(axis=1, name="bn_axis_1")(h)
    model = keras.Model(inputs, h)
    for layer in model.layers:
        for variable in layer.variables:
            variable.assign(rng.uniform(0.5, 1.5, variable.shape))
    return model


def test_what_cannot_fold_is_reported_with_the_reason_and_kept_exact(rng, capsys):
    model = _unfoldable(rng)
    plan = fold_plan(model)
    assert {name: step.into for name, step in plan.items()} == dict.fromkeys(plan)
    reasons = {name: step.reason for name, step in plan.items()}
    assert reasons == {
        "bn_shared_twice": "Conv2D 'shared' is applied more than once",
        "bn_after_relu": "Conv2D 'conv_relu' applies an activation",
        "bn_beside_add": "the output of Conv2D 'conv_used_twice' is used elsewhere too",
        "bn_after_add": "its input comes from Add 'add'",
        "bn_axis_1": "its axis is not the channel axis of Conv2D 'conv_wrong_axis'",
    }
    folded = fold_batch_norm(model, verbose=1)
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("Folded 0 of 5 batch-norm layers") and "\n" not in printed
    assert "bn_after_add (its input comes from Add 'add')" in printed
    assert all(type(folded.get_layer(name)) is folding.ChannelAffine for name in plan)
    x = rng.normal(size=(2, 6, 6, 3))
    assert _relative(folded(x), model(x)) <= 1e-8


def test_nested_models_are_planned_and_folded_inside(rng):
    block = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, name="inner_dense"), tfbn.BatchNorm(name="bn")],
        name="block",
    )
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn_outer")(block(inputs)))
    for variable in model.variables:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape))
    assert fold_plan(model) == {
        "block/bn": FoldStep("inner_dense", ""),
        "bn_outer": FoldStep(None, "its input is a model input or comes from a nested model"),
    }
    folded = fold_batch_norm(model)
    assert type(folded.get_layer("block").get_layer("bn")) is folding.FoldedAway
    x = rng.normal(size=(3, 5))
    assert _relative(folded(x), model(x)) <= 1e-8


def test_a_folded_model_saves_and_reloads(rng, tmp_path):
    model = _unfoldable(rng)
    folded = fold_batch_norm(model)
    folded.save(tmp_path / "folded.keras")
    reloaded = keras.saving.load_model(tmp_path / "folded.keras")
    x = rng.normal(size=(2, 6, 6, 3))
    np.testing.assert_array_equal(reloaded(x), folded(x))
