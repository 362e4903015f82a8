"""Models, images, files and layer arguments shared by several test modules."""

import gzip
import inspect
import pathlib

import keras
import numpy as np
import tensorflow as tf

import tfbn


def batch_norm_arguments(library) -> dict:
    """One non-default value per argument of Keras 3's `keras.layers.BatchNormalization`, all of
    which tf-keras's takes too, with the initializers, regularizers and constraints of `library`
    (the module `keras` or `tf_keras`)."""
    return {
        "axis": 1,
        "momentum": 0.5,
        "epsilon": 0.1,
        "center": False,
        "scale": False,
        "beta_initializer": library.initializers.Constant(0.3),
        "gamma_initializer": library.initializers.Constant(1.7),
        "moving_mean_initializer": library.initializers.Constant(0.2),
        "moving_variance_initializer": library.initializers.Constant(2.0),
        "beta_regularizer": library.regularizers.L2(0.1),
        "gamma_regularizer": library.regularizers.L1(0.2),
        "beta_constraint": library.constraints.MaxNorm(0.01, axis=0),
        "gamma_constraint": library.constraints.NonNeg(),
        "renorm": True,
        "renorm_clipping": {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1},
        "renorm_momentum": 0.6,
        "synchronized": True,
    }


def structured_images(n: int = 48, seed: int = 7) -> np.ndarray:
    """uint8 images `(n, 28, 28)` with some structure (blurred noise), as the models take them."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 7, 7, 1)).astype("float32")
    smooth = tf.image.resize(coarse, (28, 28)).numpy()[..., 0]
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def randomize_batch_norms(model, rng) -> None:
    """Moving statistics, gamma and beta far from their initial values."""
    for layer in model.layers:
        if isinstance(layer, (tfbn.BatchNorm, keras.layers.BatchNormalization)):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 1.0, channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, channels).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.3, 2.0, channels).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 1.0, channels).astype("float32"))


def train_briefly(model, rng, steps: int = 3) -> None:
    """A few SGD steps on random data, so that no weight keeps its initial value."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    shape = (32 * steps, *model.input_shape[1:])
    x = rng.uniform(0.0, 1.0, shape).astype("float32")
    y = rng.integers(0, 10, len(x))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)


def lenet(norm: str, rng, use_bias: bool = True):
    """`tfbn.lenet(norm)`, briefly trained, with randomized batch-norm variables."""
    model = tfbn.lenet(norm, use_bias=use_bias)
    train_briefly(model, rng)
    randomize_batch_norms(model, rng)
    return model


def mixed_norms_mlp():
    """6 inputs -> Dense(4) -> tfbn.BatchNorm 'bn_tfbn' -> sigmoid -> Dense(3) -> Keras's
    BatchNormalization 'bn_keras' (built in the current strategy scope, if any)."""
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            tfbn.BatchNorm(name="bn_tfbn"),
            keras.layers.Activation("sigmoid"),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(name="bn_keras"),
        ]
    )


def lenets(rng) -> dict:
    """The two exported LeNets by kind: `"tfbn"` and `"keras"` (without biases), as `lenet`
    makes them, in that order from `rng`."""
    return {"tfbn": lenet("tfbn", rng), "keras": lenet("keras", rng, use_bias=False)}


def keras_reference(model, images: np.ndarray) -> np.ndarray:
    """The Keras model's logits for uint8 images `(n, 28, 28)`, scaled by 1/255."""
    return model.predict(images[..., None].astype(np.float32) / np.float32(255.0), verbose=0)


def write_idx(path, array: np.ndarray) -> None:
    """Writes `array` as an IDX file of unsigned bytes (gzipped when `path` ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    pathlib.Path(path).write_bytes(data)


def init_parameters(init) -> list[tuple[str, object, object]]:
    """`(name, kind, default)` of each parameter of `init` but `self` and `**kwargs`."""
    return [
        (p.name, p.kind, p.default)
        for p in inspect.signature(init).parameters.values()
        if p.name not in ("self", "kwargs")
    ]
