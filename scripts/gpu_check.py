"""Checks tfbn on Keras's JAX backend, on a GPU, with no TensorFlow installed.

Needs only JAX (with its GPU plugin), Keras, tfbn and their pure-Python dependencies; see
docs/guide/gpu.md for the installation from wheels. It sets `KERAS_BACKEND=jax` itself and never
imports TensorFlow. Checks, one line each (`PASS` or `FAIL` and the numbers):

- `layer/...`: `tfbn.BatchNorm` in training mode, forward and backward (gradients with respect to
  the input, gamma and beta) on the device against float64 NumPy on the CPU: inputs with
  |mean| / std = 1e4 and ordinary ones, several shapes and axes, a mask, renorm with clipping and
  ghost batches.
- `recalibrate/exact`, `recalibrate/fast`, `inspect`: on a small model whose two batch norms see
  the input and a Dense layer's output, the statistics they measure against float64 NumPy
  population statistics of the same data.
- `same-as-keras/...` and `time/...`: tfbn's layer and `keras.layers.BatchNormalization` under
  `jax.jit`, forward + backward on `(128, 32, 32, 64)` and `(4096, 1024)` float32: their `dx`
  agree, and their median times (interleaved repeats) with the ratio tfbn / keras (not a check).
- `no-tensorflow`: TensorFlow was not imported.

Usage: `python scripts/gpu_check.py [--cpu] [--quick] [--repeats N]`. Exit status 0 when every
check passes, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib

EPS = 1e-3
# Largest error allowed, relative to the largest reference value (at least 1).
TOLERANCE = {"ordinary": 1e-4, "mean1e4": 2e-3}
# Statistics: |error| / population std for means, relative error for variances.
STATISTICS_TOLERANCE = 1e-4
# (name, shape, axis, options): `mask` (drop ~40% of the positions), `renorm`, `ghost` (batches
# of 4 examples).
LAYER_CASES = (
    ("2d", (256, 16), -1, ()),
    ("4d", (16, 6, 6, 8), -1, ()),
    ("4d-nchw", (16, 8, 6, 6), 1, ()),
    ("5d-axis2", (4, 4, 5, 5, 3), 2, ()),
    ("3d-mask", (8, 7, 6), -1, ("mask",)),
    ("2d-renorm", (64, 6), -1, ("renorm",)),
    ("3d-ghost", (16, 5, 4), -1, ("ghost",)),
)
RENORM_CLIPPING = {"rmin": 0.5, "rmax": 1.5, "dmax": 0.5}
GHOST_BATCH = 4
TIMING_SHAPES = {
    False: {"4d": (128, 32, 32, 64), "2d": (4096, 1024)},
    True: {"4d": (8, 4, 4, 8), "2d": (16, 32)},
}


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # TensorFlow's errors from traced code start with "in user code:" and end with the message.
    line = (lines[-1] if lines[0].endswith(":") else lines[0]) if lines else ""
    return f"{type(error).__name__}: {line[:300]}"


def _report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


# ----------------------------------------------------------------------------- references
def _reference(x, dy, axis, gamma, beta, mask=None, renorm=None):
    """float64 training-mode batch norm of `x` and its gradients for the upstream gradient `dy`.

    Statistics over every axis but `axis` (masked-out positions left out of them, normalized
    all the same); `renorm = (mean, stddev, clipping)` applies Batch Renormalization's `r` and `d`
    (constants for the gradient). Returns `(y, dx, dgamma, dbeta)`.
    """
    import numpy as np

    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    gamma, beta = np.reshape(gamma, shape), np.reshape(beta, shape)
    w = np.ones_like(x) if mask is None else np.broadcast_to(mask[..., None], x.shape) * 1.0
    n = w.sum(axes, keepdims=True)
    mean = (w * x).sum(axes, keepdims=True) / n
    sigma = np.sqrt((w * (x - mean) ** 2).sum(axes, keepdims=True) / n + EPS)
    xhat = (x - mean) / sigma
    r, d = np.ones_like(sigma), np.zeros_like(sigma)
    if renorm is not None:
        moving_mean, moving_std, clip = renorm
        moving_mean, moving_std = np.reshape(moving_mean, shape), np.reshape(moving_std, shape)
        r = np.clip(sigma / moving_std, clip["rmin"], clip["rmax"])
        d = np.clip((mean - moving_mean) / moving_std, -clip["dmax"], clip["dmax"])
    y = gamma * (xhat * r + d) + beta
    # y_j depends on x_i directly and through the mean and variance, which only the positions
    # with w = 1 enter: dx_i = g_i / s - w_i / n (sum(g) + xhat_i sum(g xhat)) / s, g = gamma r dy.
    g = gamma * r * dy
    dx = g - w / n * (g.sum(axes, keepdims=True) + xhat * (g * xhat).sum(axes, keepdims=True))
    dx /= sigma
    return y, dx, (dy * (xhat * r + d)).sum(axes), dy.sum(axes)


def _ghost_reference(x, dy, axis, gamma, beta):
    """`_reference` per ghost batch: examples j, j + g, j + 2g, ... with g = n // GHOST_BATCH."""
    import numpy as np

    groups = x.shape[0] // GHOST_BATCH
    y, dx = np.empty(x.shape), np.empty(x.shape)
    dgamma = dbeta = 0.0
    for j in range(groups):
        yj, dxj, dgj, dbj = _reference(x[j::groups], dy[j::groups], axis, gamma, beta)
        y[j::groups], dx[j::groups] = yj, dxj
        dgamma, dbeta = dgamma + dgj, dbeta + dbj
    return y, dx, dgamma, dbeta


def _population(x, axis=-1):
    """float64 mean and biased variance of `x` over every axis but `axis`."""
    import numpy as np

    x = np.asarray(x, np.float64)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return x.mean(axes), x.var(axes)


# ----------------------------------------------------------------------------- the layer
def _gradients(layer, x, dy, mask=None):
    """`(y, dx, dgamma, dbeta)` of `layer` in training mode, computed by JAX on the device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if not layer.built:
        layer.build(tuple(x.shape))
    names = [v.path.split("/")[-1] for v in layer.trainable_variables]
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        kwargs = {} if mask is None else {"mask": mask}
        y, _ = layer.stateless_call(trainable, non_trainable, x, training=True, **kwargs)
        return jnp.sum(y * dy), y

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (dvars, dx), y = grad(trainable, x)
    found = dict(zip(names, (np.asarray(g) for g in dvars), strict=True))
    return np.asarray(y), np.asarray(dx), found["gamma"], found["beta"]


def _layer_check(name, shape, axis, options, scale, device) -> bool:
    import jax
    import numpy as np

    import tfbn

    rng = np.random.default_rng(zlib.crc32(f"{name}/{scale}".encode()))
    channels = shape[axis]
    sign = rng.choice([-1.0, 1.0], size=channels)
    offset = sign * (1e4 if scale == "mean1e4" else 2.0)
    caxis = axis % len(shape)
    bshape = [1] * len(shape)
    bshape[caxis] = channels
    std = 1.0 if scale == "mean1e4" else 3.0
    x = (np.reshape(offset, bshape) + std * rng.standard_normal(shape)).astype("float32")
    dy = rng.standard_normal(shape).astype("float32")
    gamma = rng.uniform(0.5, 2.0, channels).astype("float32")
    beta = rng.uniform(-1.0, 1.0, channels).astype("float32")
    kwargs, mask, renorm = {"axis": axis, "epsilon": EPS}, None, None
    if "renorm" in options:
        kwargs.update(renorm=True, renorm_clipping=RENORM_CLIPPING)
    if "ghost" in options:
        kwargs["virtual_batch_size"] = GHOST_BATCH
    layer = tfbn.BatchNorm(**kwargs)
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    if "renorm" in options:
        # Moving statistics that make some channels clip and some not.
        moving_mean = (offset + rng.uniform(-2, 2, channels)).astype("float32")
        moving_std = rng.uniform(1.0, 8.0, channels).astype("float32")
        layer.renorm_mean.assign(moving_mean)
        layer.renorm_stddev.assign(moving_std)
        renorm = (moving_mean, moving_std, RENORM_CLIPPING)
    if "mask" in options:
        mask = rng.random(shape[:-1]) > 0.4
    on_device = [jax.device_put(a, device) for a in (x, dy)]
    device_mask = None if mask is None else jax.device_put(mask, device)
    got = _gradients(layer, *on_device, mask=device_mask)
    if "ghost" in options:
        want = _ghost_reference(x, dy, caxis, gamma, beta)
    else:
        want = _reference(x, dy, caxis, gamma, beta, mask=mask, renorm=renorm)
    errors = {
        label: float(np.abs(g - w).max() / max(1.0, np.abs(w).max()))
        for label, g, w in zip(("y", "dx", "dgamma", "dbeta"), got, want, strict=True)
    }
    tol = TOLERANCE[scale]
    detail = ", ".join(f"{k} err {v:.1e}" for k, v in errors.items()) + f" (tol {tol:.0e})"
    return _report(f"layer/{name}/{scale}", max(errors.values()) <= tol, detail)


# ----------------------------------------------------------------------------- statistics
def _statistics_model():
    """Two batch norms: one on the input, one on a Dense layer's output; their references."""
    import keras
    import numpy as np

    import tfbn

    rng = np.random.default_rng(7)
    inputs = keras.Input((6, 6, 3))
    a = tfbn.BatchNorm(name="bn_input")(inputs)
    dense = keras.layers.Dense(4, name="dense")
    b = tfbn.BatchNorm(name="bn_dense")(dense(inputs))
    joined = keras.layers.Concatenate()([a, b])
    outputs = keras.layers.Dense(2, name="logits")(keras.layers.Flatten()(joined))
    model = keras.Model(inputs, outputs)
    kernel = rng.normal(size=(3, 4)).astype("float32")
    bias = rng.normal(size=4).astype("float32")
    dense.set_weights([kernel, bias])
    x = (rng.normal(3.0, 2.0, size=(64, 6, 6, 3))).astype("float32")
    h = x.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)
    return model, x, {"bn_input": _population(x), "bn_dense": _population(h)}


def _statistics_errors(measured: dict, references: dict) -> tuple[float, float]:
    """Worst mean error (in population stds) and relative variance error over the layers."""
    import numpy as np

    mean_err = var_err = 0.0
    for name, (mean, var) in references.items():
        got_mean, got_var = (np.asarray(v, np.float64) for v in measured[name])
        mean_err = max(mean_err, float((np.abs(got_mean - mean) / np.sqrt(var)).max()))
        var_err = max(var_err, float((np.abs(got_var - var) / var).max()))
    return mean_err, var_err


def _statistics_detail(mean_err: float, var_err: float) -> str:
    return (
        f"mean err {mean_err:.1e} std, variance rel err {var_err:.1e} "
        f"(tol {STATISTICS_TOLERANCE:.0e})"
    )


def _recalibrate_check(mode: str) -> bool:
    import numpy as np

    import tfbn

    model, x, references = _statistics_model()
    batches = [x[i : i + 16] for i in range(0, len(x), 16)]
    tfbn.recalibrate(model, batches, mode=mode, verbose=0)
    measured = {
        name: (model.get_layer(name).moving_mean, model.get_layer(name).moving_variance)
        for name in references
    }
    mean_err, var_err = _statistics_errors(
        {k: tuple(np.asarray(v) for v in pair) for k, pair in measured.items()}, references
    )
    ok = max(mean_err, var_err) <= STATISTICS_TOLERANCE
    return _report(f"recalibrate/{mode}", ok, _statistics_detail(mean_err, var_err))


def _inspect_check() -> bool:
    import tfbn

    model, x, references = _statistics_model()
    report = tfbn.inspect(model, x, batch_size=16, verbose=0)
    measured = {
        layer.name: (layer.population_mean, layer.population_variance) for layer in report.layers
    }
    mean_err, var_err = _statistics_errors(measured, references)
    ok = max(mean_err, var_err) <= STATISTICS_TOLERANCE
    return _report("inspect", ok, _statistics_detail(mean_err, var_err))


# ----------------------------------------------------------------------------- timing
def _interleaved(functions: dict, repeats: int, min_sample_s: float) -> dict[str, float]:
    """Median seconds per call of each function: warmed up, then timed in rotating order."""
    import jax

    numbers = {}
    for name, fn in functions.items():
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            elapsed = time.perf_counter() - start
        numbers[name] = max(1, min(100, int(min_sample_s / max(elapsed, 1e-9)) + 1))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(numbers[name]):
                jax.block_until_ready(functions[name]())
            samples[name].append((time.perf_counter() - start) / numbers[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _timing_check(shape_name, shape, repeats, min_sample_s, device) -> bool:
    import jax
    import keras
    import numpy as np

    import tfbn
    from tfbn.workflow.bench import jax_layer_step

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(2.0, 3.0, size=shape).astype("float32"), device)
    dy = jax.device_put(rng.standard_normal(shape).astype("float32"), device)
    steps = {
        "tfbn": jax_layer_step(tfbn.BatchNorm(epsilon=EPS), shape),
        "keras": jax_layer_step(keras.layers.BatchNormalization(epsilon=EPS), shape),
    }
    dx = {name: np.asarray(step(x, dy)[0][1]) for name, step in steps.items()}
    diff = float(np.abs(dx["tfbn"] - dx["keras"]).max() / max(1.0, np.abs(dx["keras"]).max()))
    ok = _report(
        f"same-as-keras/{shape_name}", diff <= 1e-4, f"dx max rel diff {diff:.1e} (tol 1e-04)"
    )
    medians = _interleaved(
        {name: (lambda step=step: step(x, dy)) for name, step in steps.items()},
        repeats,
        min_sample_s,
    )
    print(
        f"TIME time/{shape_name} {tuple(shape)} float32 fwd+bwd under jax.jit: "
        f"tfbn {medians['tfbn'] * 1e3:.3f} ms, keras {medians['keras'] * 1e3:.3f} ms, "
        f"tfbn / keras {medians['tfbn'] / medians['keras']:.2f}",
        flush=True,
    )
    return ok


# ----------------------------------------------------------------------------- main
def _guarded(name: str, check, *args) -> bool:
    """Runs one check; an exception is that check's FAIL line, with its one-line reason."""
    try:
        return check(*args)
    except Exception as error:  # noqa: BLE001 - every failure is reported, none hides the rest
        return _report(name, False, _one_line(error))


def _parse(argv):
    parser = argparse.ArgumentParser(
        description="Checks tfbn on JAX's GPU backend, without TensorFlow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU instead of a GPU")
    parser.add_argument("--quick", action="store_true", help="tiny timing shapes, few repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timing repeats (default: 15, quick 3)"
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"argument --repeats: expected a count >= 1; received {args.repeats}")
    return args


def _device(cpu: bool):
    """The device the checks run on; `None` (after a FAIL line) when no GPU is found."""
    import jax

    if cpu:
        return jax.devices("cpu")[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError as error:
        _report("device", False, f"no GPU visible to JAX ({_one_line(error)}); --cpu runs on CPU")
        return None


def main(argv=None) -> int:
    """Runs every check; returns the exit status (0 when all pass)."""
    args = _parse(argv)
    os.environ["KERAS_BACKEND"] = "jax"
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    # The statistics checks compare against float64 matmuls: no TF32 in the Dense layer.
    jax.config.update("jax_default_matmul_precision", "highest")
    import keras

    try:
        import tfbn

        tfbn.BatchNorm  # noqa: B018 - imports the library
    except Exception as error:  # noqa: BLE001 - nothing else can run: one line, exit 1
        _report("import", False, f"tfbn on JAX without TensorFlow: {_one_line(error)}")
        return 1
    device = _device(args.cpu)
    if device is None:
        return 1
    print(
        f"INFO device {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"keras {keras.__version__} ({keras.backend.backend()}), tfbn {tfbn.__version__}",
        flush=True,
    )
    results = []
    with jax.default_device(device):
        for name, shape, axis, options in LAYER_CASES:
            for scale in ("ordinary", "mean1e4"):
                label = f"layer/{name}/{scale}"
                results.append(
                    _guarded(label, _layer_check, name, shape, axis, options, scale, device)
                )
        for mode in ("exact", "fast"):
            results.append(_guarded(f"recalibrate/{mode}", _recalibrate_check, mode))
        results.append(_guarded("inspect", _inspect_check))
        repeats = args.repeats or (3 if args.quick else 15)
        for shape_name, shape in TIMING_SHAPES[args.quick].items():
            results.append(
                _guarded(
                    f"same-as-keras/{shape_name}",
                    _timing_check,
                    shape_name,
                    shape,
                    repeats,
                    0.0 if args.quick else 0.05,
                    device,
                )
            )
    imported = sys.modules.get("tensorflow") is not None
    results.append(
        _report(
            "no-tensorflow",
            not imported,
            "tensorflow was imported" if imported else "tensorflow was not imported",
        )
    )
    failed = results.count(False)
    passed = len(results) - failed
    _report("all", not failed, f"{passed} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
