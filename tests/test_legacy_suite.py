"""The behaviours tf-keras's own test module checks for its layer
(`tf_keras/layers/normalization/batch_normalization_test.py`), each checked here for
tfbn.legacy.BatchNorm, side by side with `tf_keras.layers.BatchNormalization` or against float64
NumPy. One test per behaviour; the name of tf-keras's test is in each docstring. Its TF1 graph-mode
cases are in tests/test_legacy_graph.py; its `batch_normalization_v1` class (TF1 defaults) has no
tfbn counterpart, and its GPU-only convnet case runs here on the CPU.
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from legacy_helpers import (  # noqa: F401 - _tf_keras_state is an autouse fixture
    LAYERS,
    Anchor,
    _tf_keras_state,
    train_shared_layer,
)
from tf_keras.src.testing_infra import test_utils

from tfbn import legacy

HARNESS_CASES = {
    "momentum_epsilon_regularizers": (
        {
            "momentum": 0.9,
            "epsilon": 0.1,
            "gamma_regularizer": "l2",
            "beta_regularizer": "l2",
        },
        (3, 4, 2),
    ),
    "no_scale_no_center": ({"scale": False, "center": False}, (3, 3)),
    "initializers_rank4": (
        {
            "gamma_initializer": "ones",
            "beta_initializer": "ones",
            "moving_mean_initializer": "zeros",
            "moving_variance_initializer": "ones",
        },
        (3, 2, 4, 2),
    ),
    "fused_true_rank4": ({"fused": True}, (3, 3, 3, 3)),
}


@pytest.mark.parametrize("case", sorted(HARNESS_CASES))
def test_tf_keras_layer_harness(case):
    """test_basic_batchnorm, test_basic_batchnorm_v2: tf-keras's own `layer_test` (weights, a
    functional and a sequential model, output shape and dtype, config and JSON round trips,
    training with `fit`) passes, and its output equals that of tf-keras's layer."""
    kwargs, shape = HARNESS_CASES[case]
    data = (10 * np.random.default_rng(3).random(shape) - 0.5).astype("float32")
    expected = test_utils.layer_test(Anchor, kwargs=dict(kwargs), input_data=data)
    test_utils.layer_test(
        legacy.BatchNorm,
        kwargs=dict(kwargs),
        input_data=data,
        expected_output=expected,
        supports_masking=True,
    )


def test_regularizers_add_losses_and_constraints_are_kept():
    """test_batchnorm_regularization: l1 regularizers give two losses at build (equal to
    tf-keras's); the constraint objects are the variables' constraints."""
    losses = []
    for cls in LAYERS:
        layer = cls(gamma_regularizer="l1", beta_regularizer="l1", gamma_initializer="ones")
        layer.build((None, 3, 4))
        assert len(layer.losses) == 2
        losses.append(sorted(float(v) for v in layer.losses))
        max_norm = tf_keras.constraints.max_norm
        layer = cls(gamma_constraint=max_norm, beta_constraint=max_norm)
        layer.build((None, 3, 4))
        assert layer.gamma.constraint == max_norm and layer.beta.constraint == max_norm
    # l1's default factor 0.01 times the four gammas of 1 (beta starts at 0).
    assert losses[0] == losses[1] == pytest.approx([0.0, 0.01 * 4])


def test_synchronized_with_fused_true_is_a_value_error():
    """test_batchnorm_sync_fused_error."""
    for cls in LAYERS:
        with pytest.raises(ValueError, match="synchronized"):
            cls(synchronized=True, fused=True)


FIT_CASES = {
    "convnet_channels_first": ({"axis": 1}, (3, 4, 4)),
    "convnet_channels_first_synchronized": ({"axis": 1, "synchronized": True}, (3, 4, 4)),
    "convnet_channels_last": ({"axis": -1}, (4, 4, 3)),
    "correctness_unfused": ({"fused": False}, (2, 2, 2)),
    "correctness_synchronized": ({"synchronized": True}, (2, 2, 2)),
    "correctness_float16_input": ({"input_dtype": "float16"}, (2, 2, 2)),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_then_predict_normalizes(case):
    """test_batchnorm_convnet(_synchronized), test_batchnorm_convnet_channel_last,
    test_batchnorm_correctness, test_batchnorm_float16: after `fit` on data of mean 5 and
    std 10, `predict` (moving statistics) gives per-channel mean 0 and std 1 once beta and gamma
    are taken out, and the weights equal those of tf-keras's layer trained alike."""
    kwargs, shape = FIT_CASES[case]
    kwargs = dict(kwargs)
    input_dtype = kwargs.pop("input_dtype", "float32")
    axis = kwargs.get("axis", -1)
    x = np.random.default_rng(5).normal(5.0, 10.0, size=(512, *shape)).astype(input_dtype)
    trained = []
    for cls in LAYERS:
        norm = cls(momentum=0.8, **kwargs)
        model = tf_keras.Sequential([tf_keras.Input(shape, dtype=input_dtype), norm])
        model.compile(loss="mse", optimizer=tf_keras.optimizers.SGD(0.01))
        model.fit(x, x.astype("float32"), epochs=4, batch_size=32, verbose=0, shuffle=False)
        trained.append(model.get_weights())
        channels = [1] * (len(shape) + 1)
        channels[axis] = -1
        out = model.predict(x, verbose=0)
        out = (out - norm.beta.numpy().reshape(channels)) / norm.gamma.numpy().reshape(channels)
        reduce = tuple(i for i in range(out.ndim) if i != axis % out.ndim)
        np.testing.assert_allclose(out.mean(reduce), 0.0, atol=0.1)
        np.testing.assert_allclose(out.std(reduce), 1.0, atol=0.1)
    for ours, theirs in zip(*trained, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_mixed_precision_dtypes():
    """test_batchnorm_mixed_precision: float16 outputs (also for integer inputs), float32
    beta and gamma; same outputs as tf-keras's layer."""
    x = np.random.default_rng(6).normal(size=(10, 4, 4, 3))
    ints = np.arange(10 * 4 * 4 * 3).reshape((10, 4, 4, 3))
    outputs = []
    for cls in LAYERS:
        norm = cls(axis=-1, momentum=0.8, dtype="mixed_float16")
        y, z = norm(x), norm(ints)
        assert y.dtype == z.dtype == tf.float16
        assert norm.beta.dtype.base_dtype == norm.gamma.dtype.base_dtype == tf.float32
        outputs.append((y.numpy(), z.numpy()))
    for ours, theirs in zip(*outputs, strict=True):
        np.testing.assert_allclose(ours.astype("float32"), theirs.astype("float32"), rtol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_mixed_precision_does_not_overflow(fused):
    """test_batchnorm_mixed_precision_does_not_overflow: float16 inputs -1000 and 1000, whose
    variance overflows float16, normalize to -1 and 1."""
    x = np.array([-1000.0, 1000.0]).reshape((2, 1, 1, 1))
    for cls in LAYERS:
        norm = cls(axis=-1, fused=fused, dtype="mixed_float16")
        y = norm(x, training=True)
        np.testing.assert_allclose(y.numpy(), [[[[-1.0]]], [[[1.0]]]], atol=1e-3)


def test_frozen_after_fit_trains_like_it_evaluates():
    """test_batchnorm_non_trainable_with_fit: after `trainable = False` and a new compile,
    `train_on_batch` reports the loss that `evaluate` does (inference mode, no update)."""
    rng = np.random.default_rng(7)
    x, y = rng.random((100, 3)), rng.random((100, 3))
    test_x, test_y = rng.random((100, 3)), rng.random((100, 3))
    for cls in LAYERS:
        inputs = tf_keras.Input((3,))
        bn = cls()
        model = tf_keras.Model(inputs, bn(inputs))
        model.compile("rmsprop", "mse")
        model.fit(x, y, verbose=0)
        test_loss = model.evaluate(test_x, test_y, verbose=0)
        bn.trainable = False
        model.compile("rmsprop", "mse")
        assert model.train_on_batch(test_x, test_y) == pytest.approx(test_loss, rel=1e-6)


def _padded_masking_model(cls, **kwargs):
    inputs = tf_keras.layers.Input((None, 2))
    masked = tf_keras.layers.Masking()(inputs)
    normed = cls(momentum=0.0, **kwargs)(masked)
    return tf_keras.Model(inputs, normed)


PADDED = np.array([[[1, 5], [2, 5], [0, 0], [0, 0]] for _ in range(10)], dtype="float32")


def test_masking_layer_padding_does_not_count():
    """test_batchnorm_ignore_masked_values: after `Masking()`, the zero padding does not count:
    moving mean [1.5, 5] and moving variance [0.25, 0] exactly."""
    for cls in LAYERS:
        model = _padded_masking_model(cls)
        model.compile("rmsprop", "mse")
        model.fit(PADDED, PADDED, batch_size=10, epochs=5, verbose=0)
        np.testing.assert_array_equal(model.layers[2].moving_mean.numpy(), [1.5, 5.0])
        np.testing.assert_array_equal(model.layers[2].moving_variance.numpy(), [0.25, 0.0])


def test_synchronized_masking_under_a_strategy():
    """test_sync_batchnorm_with_mask: the same with `synchronized=True` under MirroredStrategy,
    trained on a distributed dataset."""
    for cls in LAYERS:
        strategy = tf.distribute.MirroredStrategy(["CPU:0"])
        data = strategy.distribute_datasets_from_function(
            lambda _: tf.data.Dataset.from_tensors((PADDED, PADDED)).repeat()
        )
        with strategy.scope():
            model = _padded_masking_model(cls, synchronized=True)
        model.compile("rmsprop", "mse")
        model.fit(data, steps_per_epoch=1, epochs=5, verbose=0)
        np.testing.assert_allclose(model.layers[2].moving_mean.numpy(), [1.5, 5.0], atol=1e-6)
        np.testing.assert_allclose(model.layers[2].moving_variance.numpy(), [0.25, 0.0], atol=1e-6)


def test_updates_in_a_tf_function_model_call():
    """test_eager_batchnorm_in_custom_model_call_with_tf_function: a subclassed model whose
    `call` is a tf.function updates the moving statistics: after ten batches of one value 0.5,
    mean 0.5 * (1 - 0.99^10) and variance 0.99^10 (float64 NumPy)."""
    for cls in LAYERS:

        class MyModel(tf_keras.Model):
            def __init__(self, cls=cls):
                super().__init__()
                self.bn = cls()

            @tf.function
            def call(self, x, training):
                return self.bn(x, training=training)

        model = MyModel()
        for _ in range(10):
            model(tf.constant(0.5, shape=[1, 1]), training=True)
        np.testing.assert_allclose(model.bn.moving_mean.numpy(), [0.5 * (1 - 0.99**10)], rtol=1e-5)
        np.testing.assert_allclose(model.bn.moving_variance.numpy(), [0.99**10], rtol=1e-5)


@pytest.mark.parametrize("rank", [4, 5])
def test_bessels_correction_when_fused(rank):
    """test_bessels_correction: fused, values [0, 2], momentum 0.5, moving variance from 0:
    the unbiased variance 2 moves it to exactly 1."""
    x = tf.constant([0.0, 2.0], shape=[2] + [1] * (rank - 1))
    for cls in LAYERS:
        layer = cls(momentum=0.5, moving_variance_initializer="zeros")
        layer(x, training=True)
        assert layer.fused is True
        np.testing.assert_array_equal(layer.moving_variance.numpy(), [1.0])


def test_one_layer_in_several_tf_functions():
    """test_can_be_used_in_multiple_graphs: a fused layer called in two tf.functions and
    eagerly, one after the other (float64 NumPy: three normalizations of [-1000, 1000])."""
    x = np.array([-1000.0, 1000.0]).reshape((2, 1, 1, 1))
    want = x
    for _ in range(3):
        want = (want - want.mean()) / np.sqrt(want.var() + 1e-3)
    for cls in LAYERS:
        norm = cls(scale=False, center=False, fused=True)
        fn1 = tf.function(lambda x, norm=norm: norm(x, training=True))
        fn2 = tf.function(lambda x, norm=norm: norm(x, training=True))
        y = norm(fn2(fn1(x)), training=True)
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5)


FUSED_CASES = [
    # (kwargs, input shape, `fused` before build, after build), from tf-keras's test.
    ({}, (4, 4, 4), None, True),
    ({}, (4, 4), None, False),
    ({}, (4, 4, 4, 4), None, True),
    ({"virtual_batch_size": 2}, (4, 4, 4), False, False),
    ({"fused": False}, (4, 4, 4), False, False),
    ({"fused": True, "axis": [3]}, (4, 4, 4), True, True),
    ({"axis": 1}, (4, 4, 4), None, True),
    ({"axis": 2}, (4, 4, 4), False, False),
    ({"renorm": True}, (4, 4, 4), False, False),
    ({"synchronized": True}, (4, 4, 4), False, False),
    ({"dtype": "float64"}, (4, 4, 4), False, False),
    ({"axis": 2}, (4, 4, 4, 4), False, False),
]


@pytest.mark.parametrize("kwargs, shape, before, after", FUSED_CASES)
def test_fused_attribute_reports_the_kernel(kwargs, shape, before, after):
    """test_v2_fused_attribute: `fused` before and after build on a symbolic input, as tf-keras's
    layer reports it."""
    for cls in LAYERS:
        norm = cls(**kwargs)
        assert norm.fused is before
        norm(tf_keras.Input(shape=shape))
        assert norm.fused is after


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fused": True, "renorm": True}, "fused.*renorm"),
        ({"fused": True, "axis": 2}, "fused.*when axis is 1 or 3"),
        ({"fused": True, "axis": [1, 3]}, "fused.*when axis is 1 or 3"),
        ({"fused": True, "virtual_batch_size": 2}, "fused.*virtual_batch_size"),
        ({"fused": True, "adjustment": lambda _: (1, 0)}, "fused.*adjustment"),
    ],
)
def test_fused_true_that_cannot_fuse_is_tf_keras_value_error(kwargs, match):
    """test_v2_fused_attribute: tf-keras's errors (and wording) for `fused=True`."""
    for cls in LAYERS:
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


def test_fused_true_on_rank_3_input_is_tf_keras_value_error():
    """test_v2_fused_attribute: `fused=True` with a rank-3 input."""
    for cls in LAYERS:
        norm = cls(fused=True)
        assert norm.fused is True
        with pytest.raises(ValueError, match="4D or 5D input tensors"):
            norm(tf_keras.Input(shape=(4, 4)))


def test_updates_are_tracked_in_a_wrap_function():
    """test_updates_in_wrap_function: in `tf.compat.v1.wrap_function` a training call registers
    its updates in `layer.updates`; running them moves the moving mean as tf-keras's do."""
    means = []
    for cls in LAYERS:
        layers = []

        def my_func(cls=cls, layers=layers):
            layer = cls(momentum=0.5)
            layers.append(layer)
            y = layer(tf.fill((10, 1), 3.0), training=True)
            assert layer.updates
            with tf.control_dependencies(tf.nest.flatten(layer.updates)):
                return tf.identity(y)

        tf.compat.v1.wrap_function(my_func, [])()
        means.append(layers[0].moving_mean.numpy())
    np.testing.assert_allclose(means, [[1.5], [1.5]])


def test_ghost_batches_with_unknown_shapes_and_a_batch_of_one():
    """test_basic_batchnorm_v2_input_shape_and_virtual_batch_size: `virtual_batch_size=8`
    builds on an input of unknown spatial size and runs inference on one example (as tf-keras's
    layer does, same output); training on a batch it does not divide is an error, which tfbn's
    ValueError names."""
    x = np.ones((1, 28, 28), "float32") * 2
    outputs = []
    for cls in LAYERS:
        cls(virtual_batch_size=8)(tf_keras.Input(shape=(None, None, 3)))
        outputs.append(cls(virtual_batch_size=8)(x).numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Reshape"):
        Anchor(virtual_batch_size=8)(x, training=True)
    with pytest.raises(ValueError, match="virtual_batch_size=8"):
        legacy.BatchNorm(virtual_batch_size=8)(x, training=True)


def test_empty_batch_keeps_the_moving_statistics():
    """test_fused_batchnorm_empty_batch: a batch of 0 examples under a strategy with partial
    batches: the layer is fused, the tape watches gamma then beta, and the moving statistics stay
    as they were (tf-keras keeps them only under such a strategy; tfbn also without one)."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    strategy.extended.enable_partial_batch_handling = True
    for cls in LAYERS:
        with strategy.scope():
            layer = cls()

        def fn(layer=layer):
            with tf.GradientTape() as tape:
                layer(tf.ones((0, 2, 2, 2)), training=True)
            return tape

        tape = strategy.run(fn)
        assert layer.fused is True
        watched = tape.watched_variables()
        assert watched[0] is layer.gamma and watched[1] is layer.beta
        np.testing.assert_array_equal(layer.moving_mean.numpy(), [0.0, 0.0])
        np.testing.assert_array_equal(layer.moving_variance.numpy(), [1.0, 1.0])
    # Without such a strategy tf-keras's moving statistics become NaN; tfbn's stay.
    layer, anchor = legacy.BatchNorm(), Anchor()
    assert layer(tf.ones((0, 2, 2, 2)), training=True).shape == (0, 2, 2, 2)
    anchor(tf.ones((0, 2, 2, 2)), training=True)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [1.0, 1.0])
    assert np.isnan(anchor.moving_variance.numpy()).all()


def test_shared_layer_across_inputs_and_models():
    """test_shared_batchnorm: one layer called on two inputs, a model trained with it, that model
    reused inside another and trained again: the weights equal those of tf-keras's layer."""
    x = np.random.default_rng(8).normal(loc=5.0, scale=10.0, size=(2, 10))
    trained = [train_shared_layer(cls, x, tf_keras.optimizers.SGD) for cls in LAYERS]
    for ours, theirs in zip(*trained, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_trainable_false_disables_updates():
    """test_that_trainable_disables_updates: a frozen model (or frozen layer) trains without
    changing its predictions; unfrozen it changes them."""
    rng = np.random.default_rng(9)
    val_a, val_out = rng.random((10, 4)), rng.random((10, 4))
    for cls in LAYERS:
        a = tf_keras.Input(shape=(4,))
        layer = cls()
        model = tf_keras.Model(a, layer(a))
        model.trainable = False
        model.compile(tf_keras.optimizers.SGD(0.01), "mse")
        x1 = model.predict(val_a, verbose=0)
        model.train_on_batch(val_a, val_out)
        np.testing.assert_allclose(x1, model.predict(val_a, verbose=0), atol=1e-7)
        model.trainable = True
        model.compile(tf_keras.optimizers.SGD(0.01), "mse")
        model.train_on_batch(val_a, val_out)
        assert np.abs(np.sum(x1 - model.predict(val_a, verbose=0))) > 1e-5
        layer.trainable = False
        model.compile(tf_keras.optimizers.SGD(0.01), "mse")
        x1 = model.predict(val_a, verbose=0)
        model.train_on_batch(val_a, val_out)
        np.testing.assert_allclose(x1, model.predict(val_a, verbose=0), atol=1e-7)


def test_learning_phase_one_uses_batch_statistics():
    """test_batchnorm_trainable (eager): inside `learning_phase_scope(1)` a call without
    `training` normalizes with the batch statistics, not the moving ones (float64 NumPy)."""
    val_a = np.expand_dims(np.arange(10.0), axis=1)
    want = (val_a - val_a.mean()) / np.sqrt(val_a.var() + 1e-3)
    for cls in LAYERS:
        layer = cls()
        layer.build((None, 1))
        layer.set_weights([np.array([1.0]), np.array([0.0]), np.array([0.5]), np.array([100.0])])
        with tf_keras.backend.learning_phase_scope(1):
            out = layer(tf.constant(val_a, tf.float32)).numpy()
        np.testing.assert_allclose(out, want, atol=1e-5)
