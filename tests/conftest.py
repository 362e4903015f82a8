"""Test set-up: three logical CPU devices, so tf.distribute runs with several replicas on a CPU.

The logical devices must exist before TensorFlow initializes its runtime, so this runs at import
time, before any test module touches TensorFlow.
"""

import os
import signal

# A suite started in the background of a script (`cmd &`) inherits SIGINT ignored, and an ignored
# signal stays ignored in every process it starts; the tests that send SIGINT to a `tfbn` process
# need Python's default. A handled signal is reset to the default in a started program.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

N_LOGICAL_CPUS = 3

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(N_LOGICAL_CPUS)]
)

# Several MirroredStrategy objects with different replica counts in one process allocate the same
# collective group keys ("Device ... is joining a group with size3, but that group has size 2"), so
# in this one-process suite the replicas reduce through one device instead of collective ops. The
# all-reduce semantics (and gradients through them) are the same.
_MirroredStrategy = tf.distribute.MirroredStrategy


class _TestMirroredStrategy(_MirroredStrategy):
    def __init__(self, devices=None, cross_device_ops=None):
        if cross_device_ops is None:
            cross_device_ops = tf.distribute.ReductionToOneDevice()
        super().__init__(devices, cross_device_ops=cross_device_ops)


tf.distribute.MirroredStrategy = _TestMirroredStrategy


@pytest.fixture
def cpu_devices():
    """Names of the logical CPU devices, e.g. ['/device:CPU:0', '/device:CPU:1', ...]."""
    return [d.name for d in tf.config.list_logical_devices("CPU")]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A TFDS data directory where Fashion-MNIST is prepared once from the IDX files."""
    from tfbn.workflow import data

    path = tmp_path_factory.mktemp("tfds")
    data.prepare(data.DEFAULT_DATA_DIR, path)
    return path


@pytest.fixture(scope="module")
def images():
    """uint8 images `(48, 28, 28)` with some structure (`model_helpers.structured_images`)."""
    from model_helpers import structured_images

    return structured_images()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _reset_keras_state():
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")
    # Without Python's full garbage collection, which takes seconds once TensorFlow holds many
    # objects: Python collects as it goes.
    keras.backend.clear_session(free_memory=False)
