"""tfbn.BatchNorm against Keras's BatchNormalization and a float64 NumPy version of the math."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from model_helpers import init_parameters

import tfbn
from tfbn.ops import reduction

# ---------------------------------------------------------------- NumPy reference (float64)


def np_batch_norm_train(x, gamma, beta, eps, axis):
    """The chapter's formulas: per-channel mean and biased variance over every other axis."""
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    mean = x.mean(axis=axes)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=axes)
    x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return gamma.reshape(shape) * x_hat + beta.reshape(shape), mean, var, x_hat


def np_batch_norm_grads(dy, x_hat, var, gamma, eps, axis):
    """Closed-form derivatives of the training-mode output (Ioffe and Szegedy, 2015, sec. 3)."""
    axes = tuple(i for i in range(dy.ndim) if i != axis % dy.ndim)
    shape = [1] * dy.ndim
    shape[axis] = -1
    n = dy.size / dy.shape[axis]
    d_beta = dy.sum(axis=axes)
    d_gamma = (dy * x_hat).sum(axis=axes)
    dx = (gamma / np.sqrt(var + eps)).reshape(shape) * (
        dy - d_beta.reshape(shape) / n - x_hat * d_gamma.reshape(shape) / n
    )
    return dx, d_gamma, d_beta


def _grads(layer, x, dy, training=True):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
    wrt = [x] + [w for w in (layer.gamma, layer.beta) if w is not None]
    return y.numpy(), [g.numpy() for g in tape.gradient(y, wrt, output_gradients=tf.constant(dy))]


def _assert_close(actual, expected, rtol=1e-5, atol=1e-5, scale=None):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    # Reductions of many terms: compare relative to the size of the terms summed.
    tol = atol * (1.0 if scale is None else max(1.0, scale))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=tol)


# --------------------------------------------------------------------------- parity


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    dims = [draw(st.integers(3, 6))] + [draw(st.integers(2, 6)) for _ in range(rank - 1)]
    axis = draw(st.sampled_from([a for a in range(-rank, rank) if a % rank != 0]))
    fused = draw(
        st.sampled_from(
            [None, False] + ([True] if rank >= 4 and axis % rank in (1, rank - 1) else [])
        )
    )
    return {
        "shape": tuple(dims),
        "axis": axis,
        "momentum": draw(st.floats(0.0, 0.99)),
        "epsilon": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "fused": fused,
        # Well-conditioned batches (|mean| / std <= 10): float32 parity, not cancellation.
        "loc": draw(st.floats(-5, 5)),
        "spread": draw(st.floats(0.5, 10)),
        "seed": draw(st.integers(0, 2**16)),
    }


_FEW_NEARLY_EQUAL = {  # channel 4 of its second batch: 3 values, variance 4e-4, |dx| up to 24
    "shape": (3, 6),
    "axis": -1,
    "momentum": 0.0,
    "epsilon": 1e-05,
    "center": False,
    "scale": False,
    "fused": None,
    "loc": 0.0,
    "spread": 1.0,
    "seed": 0,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example(case=_FEW_NEARLY_EQUAL)
def test_matches_keras_batch_normalization_in_both_modes(case):
    rng = np.random.default_rng(case["seed"])
    x = (rng.normal(size=case["shape"]) * case["spread"] + case["loc"]).astype("float32")
    dy = rng.normal(size=case["shape"]).astype("float32")
    common = {k: case[k] for k in ("axis", "momentum", "epsilon", "center", "scale")}
    ours = tfbn.BatchNorm(fused=case["fused"], **common)
    theirs = keras.layers.BatchNormalization(**common)
    ours.build(x.shape)
    theirs.build(x.shape)
    channels = x.shape[case["axis"]]
    # Non-trivial parameters and moving statistics, the same in both layers.
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        if getattr(ours, name) is not None:
            value = rng.uniform(0.5, 2.0, size=channels).astype("float32")
            getattr(ours, name).assign(value)
            getattr(theirs, name).assign(value)

    for batch in (x, 0.5 * x - 1.0):  # the second step starts from updated moving statistics
        y_ours, g_ours = _grads(ours, batch, dy)
        y_theirs, g_theirs = _grads(theirs, batch, dy)
        _assert_close(y_ours, y_theirs)
        n = x.size / channels
        for a, b in zip(g_ours[1:], g_theirs[1:], strict=True):
            _assert_close(a, b, scale=np.abs(b).max(), atol=1e-5 * n**0.5)
        # dx of a channel is its gradients times 1 / std: a channel of a few nearly equal values
        # has large dx, and both layers' float32 rounding grows with it. Compare per channel,
        # relative to the channel's largest |dx|.
        other_axes = tuple(i for i in range(x.ndim) if i != case["axis"] % x.ndim)
        dx_scale = np.maximum(1.0, np.abs(g_theirs[0]).max(axis=other_axes, keepdims=True))
        _assert_close(g_ours[0] / dx_scale, g_theirs[0] / dx_scale, atol=1e-5 * n**0.5)
        _assert_close(ours.moving_mean.numpy(), theirs.moving_mean.numpy())
        _assert_close(ours.moving_variance.numpy(), theirs.moving_variance.numpy())
    _assert_close(ours(x, training=False), theirs(x, training=False))


@pytest.mark.parametrize(
    "shape,axis,fused",
    [
        ((64, 7), -1, None),
        ((16, 5, 3), 1, None),
        ((8, 6, 6, 8), -1, True),
        ((8, 6, 6, 6), -1, None),
        ((8, 4, 6, 6), 1, True),
        ((8, 4, 6, 6), 1, False),
        ((4, 3, 4, 5, 8), -1, None),
        ((4, 8, 3, 4, 5), 1, True),
    ],
)
def test_training_step_equals_float64_numpy_chapter_formulas(rng, shape, axis, fused):
    x = rng.normal(size=shape) * 3.0 + 1.5
    dy = rng.normal(size=shape)
    momentum, eps = 0.9, 1e-5
    layer = tfbn.BatchNorm(axis=axis, momentum=momentum, epsilon=eps, fused=fused)
    layer.build(shape)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 2, channels)
    beta = rng.normal(size=channels)
    old_mean, old_var = rng.normal(size=channels), rng.uniform(0.5, 2, channels)
    for var, value in zip(
        (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
        (gamma, beta, old_mean, old_var),
        strict=True,
    ):
        var.assign(value.astype("float32"))

    y, (dx, d_gamma, d_beta) = _grads(layer, x.astype("float32"), dy.astype("float32"))
    y_ref, mean, var, x_hat = np_batch_norm_train(x, gamma, beta, eps, axis)
    dx_ref, d_gamma_ref, d_beta_ref = np_batch_norm_grads(dy, x_hat, var, gamma, eps, axis)
    n = x.size / channels
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_gamma, d_gamma_ref, rtol=1e-5, atol=1e-5 * n)
    np.testing.assert_allclose(d_beta, d_beta_ref, rtol=1e-5, atol=1e-5 * n)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), momentum * old_mean + (1 - momentum) * mean, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        momentum * old_var + (1 - momentum) * var,
        rtol=1e-5,
        atol=1e-5,
    )
    # Inference mode: the moving statistics, not the batch's.
    shape_c = [1] * len(shape)
    shape_c[axis] = -1
    mm, mv = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    expected = gamma.reshape(shape_c) * (x - mm.reshape(shape_c)) / np.sqrt(
        mv.reshape(shape_c) + eps
    ) + beta.reshape(shape_c)
    np.testing.assert_allclose(layer(x.astype("float32")).numpy(), expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- training resolution


def _small_model(layer):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_fit_trains_while_predict_evaluate_and_bare_call_infer(rng):
    x = (rng.normal(size=(64, 4)) * 3 + 5).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    layer = tfbn.BatchNorm(momentum=0.5)
    model = _small_model(layer)
    before = layer.moving_mean.numpy().copy()
    model.predict(x, verbose=0)
    model.evaluate(x, y, verbose=0)
    model(x)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)
    # In inference mode the output uses the moving statistics (initially mean 0, variance 1).
    dense_out = model.layers[0](x).numpy()
    np.testing.assert_allclose(
        model(x).numpy(), dense_out / np.sqrt(1 + layer.epsilon), rtol=1e-5, atol=1e-5
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    assert not np.allclose(layer.moving_mean.numpy(), before)


def test_trainable_false_means_inference_mode(rng):
    x = (rng.normal(size=(32, 4)) * 2 + 3).astype("float32")
    layer = tfbn.BatchNorm()
    layer.build(x.shape)
    layer.moving_mean.assign([1.0, 2.0, 3.0, 4.0])
    layer.trainable = False
    mean_before = layer.moving_mean.numpy().copy()
    out_train = layer(x, training=True).numpy()
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean_before)
    np.testing.assert_allclose(out_train, layer(x, training=False).numpy())
    assert layer.trainable_weights == []
    reference = keras.layers.BatchNormalization()
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())
    reference.trainable = False
    np.testing.assert_allclose(out_train, reference(x, training=True).numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("shape", [(32, 6), (8, 5, 5, 8), (8, 5, 5, 6)])
def test_mixed_precision_keeps_float32_statistics_without_overflow(rng, policy, shape):
    low = tf.float16 if policy == "mixed_float16" else tf.bfloat16
    # Values around 1e4: their squares (1e8) overflow float16.
    x = (rng.normal(size=shape) * 50 + 1e4).astype("float32")
    x_low = tf.cast(tf.constant(x), low)
    reference = tfbn.BatchNorm(momentum=0.5, dtype="float32")
    expected = reference(tf.cast(x_low, tf.float32), training=True).numpy()

    keras.mixed_precision.set_global_policy(policy)
    layer = tfbn.BatchNorm(momentum=0.5)
    out = layer(x_low, training=True)
    assert out.dtype == low
    assert layer.moving_mean.dtype == "float32" and layer.moving_variance.dtype == "float32"
    out = tf.cast(out, tf.float32).numpy()
    assert np.isfinite(out).all()
    tol = 2e-2 if low == tf.float16 else 6e-2
    np.testing.assert_allclose(out, expected, atol=tol)
    np.testing.assert_allclose(layer.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-4
    )
    inference = tf.cast(layer(x_low, training=False), tf.float32).numpy()
    assert np.isfinite(inference).all()


def test_mixed_precision_lenet_trains_with_finite_loss(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = tfbn.lenet("tfbn")
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = rng.uniform(size=(64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=64)
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert model.layers[1].moving_variance.dtype == "float32"


# --------------------------------------------------------------------------- serialization


def _variable_facts(layer):
    return [
        (v.path.split("/", 1)[-1], tuple(v.shape), v.dtype, v.trainable)
        + (v.synchronization, v.aggregation)
        for v in layer.weights
    ]


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        ({}, (None, 5)),
        ({"center": False, "axis": 1}, (None, 3, 4, 4)),
        ({"scale": False, "renorm": True}, (None, 6, 2)),
        ({"dtype": "float64"}, (None, 4)),
        ({"dtype": "mixed_float16"}, (None, 4, 4, 3)),
    ],
)
def test_is_keras_batch_normalization_with_the_same_variables_and_config(kwargs, shape):
    ours = tfbn.BatchNorm(name="bn", **kwargs)
    theirs = keras.layers.BatchNormalization(name="bn", **kwargs)
    assert isinstance(ours, keras.layers.BatchNormalization)
    ours.build(shape)
    theirs.build(shape)
    assert _variable_facts(ours) == _variable_facts(theirs)
    assert [v.name for v in ours.trainable_weights] == [v.name for v in theirs.trainable_weights]
    config = ours.get_config()
    extras = {"fused": None, "virtual_batch_size": None}
    assert config == {**theirs.get_config(), **extras}
    # Keras's class rebuilds a tfbn layer from its config once the extras are left out.
    keras_twin = keras.layers.BatchNormalization.from_config(
        {k: v for k, v in config.items() if k not in extras}
    )
    assert keras_twin.get_config() == theirs.get_config()


def test_config_round_trip_and_keras_file_reload_without_custom_objects(tmp_path, rng):
    layer = tfbn.BatchNorm(
        axis=1,
        momentum=0.8,
        epsilon=1e-4,
        center=False,
        gamma_regularizer="l2",
        beta_constraint="non_neg",
        synchronized=True,
        fused=False,
        name="bn",
    )
    config = layer.get_config()
    clone = tfbn.BatchNorm.from_config(config)
    assert clone.get_config() == config

    renorm = {"renorm": True, "renorm_clipping": {"rmax": 3.0}, "renorm_momentum": 0.9}
    model = keras.Sequential(
        [
            keras.Input((3, 4, 4)),
            tfbn.BatchNorm(axis=1, momentum=0.5),
            tfbn.BatchNorm(momentum=0.5, virtual_batch_size=4, **renorm),
            keras.layers.Flatten(),
        ]
    )
    x = (rng.normal(size=(8, 3, 4, 4)) * 2 + 1).astype("float32")
    model(x, training=True)  # move the statistics away from their initial values
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)  # no custom_objects: the layer is registered
    for ours, theirs in zip(reloaded.layers[:2], model.layers[:2], strict=True):
        assert type(ours) is tfbn.BatchNorm
        assert ours.get_config() == theirs.get_config()
        assert [v.name for v in ours.weights] == [v.name for v in theirs.weights]
        for a, b in zip(ours.weights, theirs.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"momentum": 1.0}, "`momentum`.*momentum=1.0"),
        ({"momentum": -0.1}, "`momentum`.*momentum=-0.1"),
        ({"momentum": None}, "`momentum`.*momentum=None"),
        ({"momentum": float("nan")}, "`momentum`.*momentum=nan"),
        ({"momentum": "0.9"}, "`momentum`.*momentum='0.9'"),
        ({"renorm_momentum": None}, "`renorm_momentum`.*renorm_momentum=None"),
        ({"renorm_momentum": 1.0}, "`renorm_momentum`.*renorm_momentum=1.0"),
        ({"epsilon": 0.0}, "`epsilon`.*epsilon=0.0"),
        ({"epsilon": -1e-3}, "`epsilon`.*epsilon=-0.001"),
        ({"epsilon": float("inf")}, "`epsilon`.*epsilon=inf"),
        ({"epsilon": float("nan")}, "`epsilon`.*epsilon=nan"),
        ({"epsilon": None}, "`epsilon`.*epsilon=None"),
        ({"renorm_clipping": {"rmax": float("nan")}}, "`renorm_clipping`.*rmax=nan"),
        ({"renorm_clipping": {"rmax": float("inf")}}, "`renorm_clipping`.*rmax=inf"),
        ({"renorm_clipping": {"rmax": 0, "rmin": 0}}, "rmax should be positive.*'rmax': 0"),
        ({"renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, "rmax should be greater than rmin"),
        ({"renorm_clipping": {"rmin": -0.5}}, "rmin should be non-negative.*'rmin': -0.5"),
        ({"renorm_clipping": {"dmax": -1.0}}, "dmax should be non-negative.*'dmax': -1.0"),
        ({"renorm_clipping": {"r_max": 3.0}}, "invalid keys for `renorm_clipping`.*'r_max'"),
        ({"dtype": "int32"}, "`dtype`.*dtype='int32'"),
        ({"axis": 1.5}, "axis"),
        ({"fused": "yes"}, "fused"),
        ({"fused": 1}, "`fused`.*fused=1"),
        ({"fused": True, "synchronized": True}, "fused"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfbn.BatchNorm(**kwargs)


def test_an_unsupported_keras_backend_is_a_value_error_naming_it(monkeypatch):
    # keras's other backends import their own library (openvino), which tfbn does not install:
    # the backend Keras reports is patched instead. (JAX and PyTorch: tests/test_backends.py,
    # tests/test_torch_backend.py.)
    monkeypatch.setattr(keras.backend, "backend", lambda: "openvino")
    with pytest.raises(ValueError, match="Keras backend is 'openvino'"):
        tfbn.BatchNorm()


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        ({}, (4,), "rank 2 or more"),
        ({}, (None, None), "known size"),
        ({"axis": 2}, (4, 3), "out of range"),
        ({"axis": -3}, (4, 3), "out of range"),
        ({"axis": 0}, (4, 3), "batch axis"),
        ({"fused": True}, (4, 3), "rank-4 or rank-5"),
        ({"fused": True, "axis": 2}, (4, 3, 3, 3), "channel axis 1 or last"),
    ],
)
def test_bad_build_shapes_raise_value_error(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        tfbn.BatchNorm(**kwargs).build(shape)


def test_channel_mismatch_and_integer_input_raise_value_error():
    layer = tfbn.BatchNorm()
    layer(np.zeros((4, 3), "float32"))
    with pytest.raises(ValueError, match="3 channels"):
        layer(np.zeros((4, 5), "float32"))
    with pytest.raises(ValueError, match="rank"):
        layer(np.zeros((4, 2, 3), "float32"))
    with pytest.raises(ValueError, match="floating-point"):
        tfbn.BatchNorm()(tf.zeros((4, 3), tf.int32))


def test_batch_of_one_raises_in_eager_training_and_gives_beta_in_graph_mode():
    layer = tfbn.BatchNorm(beta_initializer=keras.initializers.Constant(0.25))
    x = np.array([[1.0, 2.0, 3.0]], "float32")
    with pytest.raises(ValueError, match="batch of size 1"):
        layer(x, training=True)
    # Inference on one example is fine.
    assert np.isfinite(layer(x, training=False).numpy()).all()

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def train_step(x):
        return layer(x, training=True)

    out = train_step(x).numpy()
    np.testing.assert_allclose(out, np.full((1, 3), 0.25))
    np.testing.assert_allclose(layer.moving_variance.numpy(), np.full(3, 0.99), rtol=1e-6)


def test_zero_size_batch_leaves_moving_statistics_unchanged():
    layer = tfbn.BatchNorm(momentum=0.5)
    layer.build((None, 3))
    layer.moving_mean.assign([1.0, 2.0, 3.0])
    out = layer(tf.zeros((0, 3)), training=True)
    assert out.shape == (0, 3)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [1.0, 1.0, 1.0])


def test_xla_compiled_training_step_matches_eager(rng):
    x = (rng.normal(size=(16, 6, 6, 8)) * 2 + 1).astype("float32")
    eager = tfbn.BatchNorm(momentum=0.7)
    compiled = tfbn.BatchNorm(momentum=0.7)
    y_eager = eager(x, training=True).numpy()
    compiled.build(x.shape)
    y_xla = tf.function(lambda x: compiled(x, training=True), jit_compile=True)(x).numpy()
    np.testing.assert_allclose(y_xla, y_eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        compiled.moving_variance.numpy(), eager.moving_variance.numpy(), rtol=1e-5
    )


def test_masked_positions_do_not_count_in_the_statistics(rng):
    x = (rng.normal(size=(6, 5, 3)) * 2 + 1).astype("float32")
    mask = rng.uniform(size=(6, 5)) > 0.4
    layer = tfbn.BatchNorm(momentum=0.0, epsilon=1e-5)
    out = layer(x, training=True, mask=mask).numpy()
    kept = x[mask].astype(np.float64)  # (n_kept, 3): the unmasked positions only
    np.testing.assert_allclose(layer.moving_mean.numpy(), kept.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), kept.var(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        out, (x - kept.mean(0)) / np.sqrt(kept.var(0) + 1e-5), rtol=1e-4, atol=1e-4
    )
    with pytest.raises(ValueError, match="mask"):
        layer(x, training=True, mask=np.ones((6, 5, 3), bool))


def np_masked_moments(x, mask, axis):
    """float64 statistics over the kept positions, with Keras's meaning of a mask: rank
    `x.ndim - 1`, covering axes 0 .. ndim - 2, broadcast along the last axis (and along its own
    size-1 axes)."""
    x = np.asarray(x, np.float64)
    w = np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    count = w.sum(axes, keepdims=True)
    mean = (w * x).sum(axes, keepdims=True) / count
    variance = (w * (x - mean) ** 2).sum(axes, keepdims=True) / count
    return mean, variance, count


@pytest.mark.parametrize(
    "shape,axis,mask_shape,kwargs",
    [
        ((6, 4, 5), 1, (6, 4), {}),  # a Masking() mask before axis=1: whole (example, channel)s
        ((6, 4, 5), 1, (6, 4), {"virtual_batch_size": 3}),
        ((5, 3, 4, 4), 1, (5, 3, 4), {"fused": True}),
        ((4, 5, 3, 2), -1, (4, 1, 3), {}),  # a size-1 axis broadcasts
        ((4, 5, 3, 2), 2, (1, 5, 1), {"renorm": True}),
        ((8, 3, 4), -1, (8, 3), {"synchronized": True}),
    ],
)
def test_masks_have_keras_meaning_in_training_and_inference(rng, shape, axis, mask_shape, kwargs):
    x = (rng.normal(size=shape) * 2 + 1).astype("float32")
    mask = rng.uniform(size=mask_shape) > 0.3
    if mask_shape[0] > 1:
        mask[:2] = True  # examples 0 and 1 (one per virtual batch) keep every channel
    mask.flat[0] = True
    layer = tfbn.BatchNorm(axis=axis, momentum=0.0, epsilon=0.1, **kwargs)
    out = layer(x, training=True, mask=mask).numpy()
    if "virtual_batch_size" in kwargs:
        groups = shape[0] // kwargs["virtual_batch_size"]
        parts = [np_masked_moments(x[j::groups], mask[j::groups], axis) for j in range(groups)]
        expected = np.empty(shape)
        for j, (mean, variance, _) in enumerate(parts):
            expected[j::groups] = (x[j::groups] - mean) / np.sqrt(variance + 0.1)
        weights = np.array([c for _, _, c in parts]) / sum(c for _, _, c in parts)
        mean = sum(w * m for w, (m, _, _) in zip(weights, parts, strict=True))
        variance = sum(w * v for w, (_, v, _) in zip(weights, parts, strict=True))
    else:
        mean, variance, _ = np_masked_moments(x, mask, axis)
        expected = (x - mean) / np.sqrt(variance + 0.1)
    if kwargs.get("renorm"):  # r = sigma_B / 1 and d = (mu_B - 0) / 1 at the first step
        expected = expected * np.sqrt(variance + 0.1) + mean
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), variance.ravel(), rtol=1e-4, atol=1e-6
    )
    # Inference normalizes every position with the moving statistics, mask or not.
    inferred = layer(x, training=False, mask=mask).numpy()
    reference = (x - mean) / np.sqrt(layer.moving_variance.numpy().reshape(mean.shape) + 0.1)
    np.testing.assert_allclose(inferred, reference, rtol=1e-4, atol=1e-4)


def test_masking_then_batch_norm_on_axis_1_in_fit_counts_only_kept_values(rng):
    n, channels, steps = 16, 3, 5
    x = (rng.normal(size=(n, channels, steps)) * 2 + 3).astype("float32")
    x[rng.uniform(size=(n, channels)) < 0.3] = 0.0  # Masking() drops these (example, channel)s
    model = keras.Sequential(
        [
            keras.Input((channels, steps)),
            keras.layers.Masking(0.0),
            tfbn.BatchNorm(axis=1, momentum=0.0),
        ]
    )
    model.compile("sgd", "mse")
    model.fit(x, x, batch_size=n, epochs=1, verbose=0)
    kept = (x != 0).any(-1)
    mean, variance, _ = np_masked_moments(x, kept, 1)
    bn = model.layers[-1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), variance.ravel(), rtol=1e-4)


def test_a_mask_of_ones_with_size_one_axes_counts_every_value_it_covers():
    # Keras's own case: mask (1, 2, 1) on input (1, 2, 3, 4) covers 6 values per channel.
    x = np.arange(24, dtype="float32").reshape(1, 2, 3, 4)
    layer = tfbn.BatchNorm(momentum=0.0)
    layer(x, training=True, mask=np.ones((1, 2, 1), bool))
    mean, variance, count = np_masked_moments(x, np.ones((1, 2, 1)), -1)
    np.testing.assert_array_equal(count.ravel(), [6, 6, 6, 6])
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance.ravel(), rtol=1e-5)


@pytest.mark.parametrize(
    "shape,axis,kernel",
    [
        ((6, 5, 5, 8), -1, "fused"),
        ((6, 5, 4, 5, 8), -1, "fused"),
        ((64, 256), -1, "fused_rank4"),
        ((4, 16, 256), -1, "fused_rank4"),
    ],
)
def test_every_fused_kernel_equals_the_composed_kernel(rng, shape, axis, kernel):
    from tfbn.ops import kernels as fast

    assert fast.kernel_for(shape, axis, tf.float32) == kernel
    assert fast.kernel_for((None, *shape[1:]), axis, tf.float32) == "fused_or_composed"
    x = tf.constant((rng.normal(size=shape) * 2 + 3).astype("float32"))
    dy = tf.constant(rng.normal(size=shape).astype("float32"))
    channels = shape[axis]
    gamma = tf.constant(rng.uniform(0.5, 2, channels).astype("float32"))
    beta = tf.constant(rng.normal(size=channels).astype("float32"))
    spec = tf.TensorSpec((None, *shape[1:]), tf.float32)

    def run(x, fused):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, stats = fast.training_batch_norm(
                x, axis, gamma=gamma, beta=beta, epsilon=1e-5, fused=fused
            )
        grads = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
        return [y, *grads, stats.mean, stats.variance, stats.count]

    # The fused kernel, the run-time choice with an unknown batch size, the composed kernel.
    results = [
        run(x, None),
        tf.function(lambda x: run(x, None), input_signature=[spec])(x),
        run(x, False),
    ]
    n = np.prod(shape) / channels
    for fused in results[:2]:
        for a, b in zip(fused, results[2], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, n**0.5))


def _check_composed_against_numpy(rng, shape, axis, spec, jit_compile):
    """Runs `fast.composed_batch_norm` (forward, gradients, statistics) traced with input spec
    `spec` and compares it with the float64 formulas; returns the traced step."""
    from tfbn.ops import kernels as fast

    x = rng.normal(size=shape) * 3.0 + 1.5
    dy = rng.normal(size=shape)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 2, channels)
    beta = rng.normal(size=channels)

    @tf.function(
        jit_compile=jit_compile,
        input_signature=[tf.TensorSpec(spec, tf.float32), tf.TensorSpec(shape, tf.float32)],
    )
    def step(x, dy):
        g, b = tf.constant(gamma, tf.float32), tf.constant(beta, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch([x, g, b])
            y, stats = fast.composed_batch_norm(x, g, b, 1e-5, axis)
        return (y, *tape.gradient(y, [x, g, b], output_gradients=dy), stats.mean, stats.variance)

    y, dx, d_gamma, d_beta, mean, var = (
        t.numpy() for t in step(x.astype("float32"), dy.astype("float32"))
    )
    y_ref, mean_ref, var_ref, x_hat = np_batch_norm_train(x, gamma, beta, 1e-5, axis)
    dx_ref, d_gamma_ref, d_beta_ref = np_batch_norm_grads(dy, x_hat, var_ref, gamma, 1e-5, axis)
    n = x.size / channels
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(d_gamma, d_gamma_ref, rtol=1e-5, atol=1e-5 * n)
    np.testing.assert_allclose(d_beta, d_beta_ref, rtol=1e-5, atol=1e-5 * n)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-5, atol=1e-6)
    return step


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "shape,known_inner",
    [
        ((8, 6, 6, 6), True),  # six channels: all 36 positions of an example in one row
        ((4, 12, 12, 6), True),  # 48 of the 144 positions per row
        ((5, 3, 4, 2, 3), True),
        ((6, 7, 5), True),
        ((6, 5, 5, 6), False),  # inner dimensions unknown when traced: one position per row
        ((10, 70), True),
        ((4, 3, 3, 96), True),
        ((70, 4, 4, 32), True),  # 70 rows of 256: under XLA, two blocks of 32 rows and 6 apart
        ((128, 40), True),  # 128 rows: four whole blocks
    ],
)
def test_composed_kernel_equals_float64_numpy(rng, shape, known_inner, jit_compile):
    spec = [None] * len(shape) if not known_inner else [None, *shape[1:]]
    spec[-1] = shape[-1]
    _check_composed_against_numpy(rng, shape, -1, spec, jit_compile)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    "shape,axis,known",
    [
        ((6, 8, 5, 5), 1, True),
        ((6, 8, 5, 5), 1, False),  # all but the channel axis unknown when traced
        ((4, 3, 5, 6), 2, True),
        ((5, 4, 3), 1, True),
        ((4, 6, 3, 2, 2), 1, True),
        ((3, 2, 4, 5, 3), 3, True),
    ],
)
def test_composed_kernel_other_axes_equal_float64_numpy(rng, shape, axis, known, jit_compile):
    spec = list(shape) if known else [None] * len(shape)
    spec[axis] = shape[axis]
    step = _check_composed_against_numpy(rng, shape, axis, spec, jit_compile)
    graph = step.get_concrete_function().graph.as_graph_def()
    barriers = [node for node in graph.node if node.op == "XlaOptimizationBarrier"]
    assert bool(barriers) == jit_compile


@pytest.mark.parametrize("inner", [(24,), (3, 8)])
@pytest.mark.parametrize("known_rows", [True, False])
@pytest.mark.parametrize("rows", [1, 31, 63, 64, 95, 150, 1024])
def test_xla_channel_sums_equal_float64_numpy(rng, rows, known_rows, inner):
    # Blocks of 32 rows summed apart from the rows left over, with the product fused in.

    shape = (rows, *inner)
    a = rng.normal(2.0, 3.0, size=shape).astype("float32")
    b = rng.normal(size=shape).astype("float32")
    spec = tf.TensorSpec([rows if known_rows else None, *inner], tf.float32)
    sums = tf.function(
        lambda a, b: reduction.xla_channel_sums(a * b), jit_compile=True, input_signature=[spec] * 2
    )
    axes = tuple(range(len(shape) - 1))
    expected = (a.astype(np.float64) * b).sum(axis=axes)
    scale = np.abs(a.astype(np.float64) * b).sum(axis=axes).max()
    np.testing.assert_allclose(sums(a, b).numpy(), expected, atol=1e-6 * scale)
    graph = sums.get_concrete_function().graph.as_graph_def()
    blocked = any(node.op == "XlaOptimizationBarrier" for node in graph.node)
    # Fewer than two blocks' worth of rows is one plain reduction.
    assert blocked == (rows >= 64 or not known_rows)


def test_composed_kernel_variance_is_stable_for_large_means(rng):
    # Mean 1e4, std 1: E[x^2] - E[x]^2 in float32 would lose the variance entirely.
    from tfbn.ops import kernels as fast

    x = rng.normal(size=(16, 6, 6, 6)) + 1e4
    _, stats = fast.composed_batch_norm(tf.constant(x, tf.float32), None, None, 1e-5, -1)
    # The reference is the variance of the float32-rounded input, in float64.
    expected = x.astype("float32").astype(np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(stats.variance.numpy(), expected, rtol=1e-3)


def test_xla_compiled_training_keeps_the_variance_of_large_means(rng):
    # XLA expands a fused batch norm into E[x^2] - E[x]^2: at mean 1e4 that cancels. The layer
    # must give the float64 statistics of its input under jit_compile too.
    x = (rng.normal(size=(16, 6, 6, 8)) + 1e4).astype("float32")
    expected = x.astype(np.float64).var(axis=(0, 1, 2))
    layer = tfbn.BatchNorm(momentum=0.0)
    layer.build(x.shape)
    y = tf.function(lambda x: layer(x, training=True), jit_compile=True)(x).numpy()
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected, rtol=1e-3)
    x_hat = (x - x.astype(np.float64).mean(axis=(0, 1, 2))) / np.sqrt(expected + 1e-3)
    np.testing.assert_allclose(y, x_hat, atol=2e-2)


def test_xla_compiled_layer_takes_the_composed_kernel(monkeypatch, rng):
    from tfbn.ops import kernels as fast

    calls = []
    for name in ("fused_batch_norm", "composed_batch_norm"):
        original = getattr(fast, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, reduction.in_xla_context()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(fast, name, spy)
    x = (rng.normal(size=(8, 4, 4, 8)) * 2 + 1).astype("float32")
    layer = tfbn.BatchNorm()
    layer.build(x.shape)
    eager = layer(x, training=True).numpy()
    compiled = tf.function(lambda x: layer(x, training=True), jit_compile=True)(x).numpy()
    plain = tf.function(lambda x: layer(x, training=True))(x).numpy()
    assert calls == [
        ("fused_batch_norm", False),
        ("composed_batch_norm", True),
        ("fused_batch_norm", False),
    ]
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, eager, rtol=1e-5, atol=1e-5)


def test_composed_kernel_under_xla_broadcasts_instead_of_tiling():
    # Channels-last with lanes > 1: outside XLA a tiled `(rows, lanes * C)` view summed by matrix
    # products; under XLA a `(rows, lanes, C)` view, blocked sums and no tiling.
    from tfbn.ops import kernels as fast

    x = tf.zeros((96, 4, 4, 32))
    assert reduction.channel_lanes(x.shape, 32) == 8

    def ops_of(jit_compile):
        fn = tf.function(
            lambda x: fast.composed_batch_norm(x, None, None, 1e-3, -1)[0], jit_compile=jit_compile
        )
        return {node.op for node in fn.get_concrete_function(x).graph.as_graph_def().node}

    plain, compiled = ops_of(False), ops_of(True)
    assert {"Tile", "MatMul"} <= plain and "XlaOptimizationBarrier" not in plain
    assert "XlaOptimizationBarrier" in compiled and not {"Tile", "MatMul"} & compiled


def test_the_kernel_chosen_is_what_the_layer_runs(monkeypatch):
    from tfbn.ops import kernels as fast

    seen = []
    original = fast.fused_batch_norm

    def spy(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(fast, "fused_batch_norm", spy)
    layer = tfbn.BatchNorm()
    x = np.ones((4, 3, 3, 8), "float32")
    assert fast.kernel_for(x.shape, -1, tf.float32) == "fused"
    layer(x, training=True)
    assert seen == [3]
    assert tfbn.BatchNorm(fused=False)(x, training=True) is not None
    assert len(seen) == 1  # fused=False never takes the fused kernel


def test_the_signature_is_keras_own_then_tfbn_options():
    # Code that passes Keras's arguments by position or by name means the same with tfbn.
    keras_own = init_parameters(keras.layers.BatchNormalization.__init__)
    ours = init_parameters(tfbn.BatchNorm.__init__)
    assert ours[: len(keras_own)] == keras_own
    assert {name for name, _, _ in ours[len(keras_own) :]} >= {"fused", "virtual_batch_size"}
