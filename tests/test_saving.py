"""Loading .keras files: damaged files named as such, safe mode on, tfbn layers without help."""

import zipfile

import keras
import numpy as np
import pytest

import tfbn
from tfbn.utils.errors import UsageError
from tfbn.utils.saving import check_keras_file, load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model.keras"
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), tfbn.BatchNorm(name="bn"), keras.layers.Dense(2)]
    )
    model.get_layer("bn").moving_mean.assign(np.arange(4, dtype="float32"))
    model.save(path)
    return path, model


def test_a_tfbn_model_loads_without_custom_objects(saved):
    path, model = saved
    loaded = load_model(path)
    assert isinstance(loaded.get_layer("bn"), tfbn.BatchNorm)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def _truncated(data):
    return data[: len(data) // 2]


def _flipped(data):
    # One byte of the weights changed inside a well-formed archive: only the CRC tells.
    data = bytearray(data)
    data[-400] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "damage, keras_says",
    [
        (_truncated, "File not found"),
        (_flipped, "Bad CRC-32"),
        (lambda data: b"", "File not found"),
        (lambda data: b"plain text, not a zip", "File not found"),
    ],
    ids=["truncated", "flipped-byte", "empty", "text"],
)
def test_a_damaged_file_is_reported_as_corrupt(saved, tmp_path, damage, keras_says):
    path, _ = saved
    broken = tmp_path / "broken.keras"
    broken.write_bytes(damage(path.read_bytes()))
    with pytest.raises(Exception, match=keras_says):  # what Keras's own loader reports
        keras.saving.load_model(broken)
    with pytest.raises(UsageError, match=r"broken\.keras: corrupt or truncated \.keras file"):
        load_model(broken)


def test_an_archive_without_a_model_config_is_corrupt(tmp_path):
    path = tmp_path / "other.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(UsageError, match="has no config.json"):
        check_keras_file(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "[1, 2]")
    with pytest.raises(UsageError, match="describes no model"):
        check_keras_file(path)


def test_missing_file_and_folder_are_os_errors_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        load_model(tmp_path / "missing.keras")
    assert missing.value.filename == str(tmp_path / "missing.keras")
    folder = tmp_path / "folder.keras"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as directory:
        load_model(folder)
    assert directory.value.filename == str(folder)
    with pytest.raises(UsageError, match="must be a .keras file"):
        load_model(tmp_path / "model.h5")


def test_a_lambda_layer_is_refused_in_safe_mode(tmp_path):
    path = tmp_path / "lambda.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2.0)]).save(path)
    with pytest.raises(UsageError) as error:
        load_model(path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refusing to load") and "Lambda" in message
    assert "safe_mode=False" in message
    # The file itself is intact: Keras loads it when told to trust it.
    assert keras.saving.load_model(path, safe_mode=False) is not None


def test_an_unknown_class_is_named(tmp_path):
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    path = tmp_path / "custom.keras"
    keras.Sequential([keras.Input((3,)), Doubler(name="doubler")]).save(path)
    with pytest.raises(UsageError, match=r"custom\.keras: cannot rebuild the model: .*Doubler"):
        load_model(path)
