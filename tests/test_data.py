"""Fashion-MNIST through TFDS, offline: content, verification errors, shuffling and splits."""

import collections
import gzip
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfbn.workflow import data
from tfbn.workflow.config import CLASS_NAMES

SOURCE = data.DEFAULT_DATA_DIR


def _raw_idx(name):
    """An IDX file parsed with NumPy alone: header fields big-endian int32, then uint8 data."""
    raw = gzip.open(SOURCE / f"{name}.gz", "rb").read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="module")
def raw():
    return {
        "train": (_raw_idx("train-images-idx3-ubyte"), _raw_idx("train-labels-idx1-ubyte")),
        "test": (_raw_idx("t10k-images-idx3-ubyte"), _raw_idx("t10k-labels-idx1-ubyte")),
    }


def _collect(dataset):
    images, labels = [], []
    for x, y in dataset:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _keys(images, labels):
    """One hashable key per example (its pixels and label), to compare sets of examples."""
    pixels = np.round(np.asarray(images) * 255).astype(np.uint8).reshape(len(labels), -1)
    rows = np.ascontiguousarray(pixels).view(np.dtype((np.void, pixels.shape[1])))[:, 0]
    return list(zip(rows.tolist(), np.asarray(labels).tolist(), strict=True))


# ------------------------------------------------------------------------------------- content
def test_prepared_dataset_matches_raw_idx_files(tfds_dir, raw):
    loaded = data.load_fashion_mnist(
        1000, tfds_dir=tfds_dir, data_dir="/nonexistent", shuffle=False
    )
    assert (loaded.num_train, loaded.num_validation, loaded.num_test) == (60000, 0, 10000)
    assert loaded.validation is None
    assert loaded.class_names == CLASS_NAMES
    for split, dataset in (("train", loaded.train), ("test", loaded.test)):
        images, labels = _collect(dataset)
        raw_images, raw_labels = raw[split]
        np.testing.assert_array_equal(labels, raw_labels.astype(np.int32))
        np.testing.assert_array_equal(np.round(images[..., 0] * 255).astype(np.uint8), raw_images)


def test_builder_features_and_tfds_reading_path(tfds_dir, raw):
    builder = data.FashionMnistLocal(data_dir=os.fspath(tfds_dir))
    assert builder.is_prepared()
    assert builder.name == "fashion_mnist_local"
    features = builder.info.features
    assert features["image"].shape == (28, 28, 1)
    assert features["image"].np_dtype == np.uint8
    assert features["label"].names == list(CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == 60000
    assert builder.info.splits["test"].num_examples == 10000
    # TFDS's own decoding (not the batched parser of load_fashion_mnist) gives the same records.
    dataset = tfds.load(
        "fashion_mnist_local", split="test[:300]", data_dir=os.fspath(tfds_dir), download=False
    )
    examples = list(tfds.as_numpy(dataset))
    np.testing.assert_array_equal(
        np.stack([e["image"][..., 0] for e in examples]), raw["test"][0][:300]
    )
    np.testing.assert_array_equal([e["label"] for e in examples], raw["test"][1][:300])


def test_images_scaled_to_unit_interval_float32(tfds_dir, raw):
    loaded = data.load_fashion_mnist(512, tfds_dir=tfds_dir, shuffle=False)
    x, y = next(iter(loaded.test))
    assert x.dtype.name == "float32" and y.dtype.name == "int32"
    assert x.shape == (512, 28, 28, 1) and y.shape == (512,)
    np.testing.assert_allclose(
        x.numpy()[..., 0], raw["test"][0][:512] / np.float32(255.0), rtol=1e-6
    )
    images, _ = _collect(loaded.test)
    assert images.min() == 0.0 and images.max() == 1.0
    # 10000 = 19 * 512 + 272: the last batch is the remainder.
    assert [int(b[1].shape[0]) for b in loaded.test][-1] == 10000 - 19 * 512


# ------------------------------------------------------------------------------ errors on files
def _folder_with(tmp_path, replace=None, drop=None):
    """A copy of the source folder (symlinks), with one file dropped or replaced by bytes."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for spec in data.IDX_FILES.values():
        name = f"{spec.name}.gz"
        if name == drop:
            continue
        if replace and name in replace:
            (folder / name).write_bytes(replace[name])
        else:
            os.symlink(SOURCE / name, folder / name)
    return folder


def _assert_nothing_prepared(tfds_dir):
    builder = data.FashionMnistLocal(data_dir=os.fspath(tfds_dir))
    assert not builder.is_prepared()
    version_dir = tfds_dir / "fashion_mnist_local" / "1.0.0"
    assert not version_dir.exists() or not any(version_dir.iterdir())


def test_missing_file_raises_data_error_naming_it(tmp_path):
    folder = _folder_with(tmp_path, drop="train-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte") as info:
        data.check_data_dir(folder)
    message = str(info.value)
    assert "missing" in message
    assert "apt-get install dataset-fashion-mnist" in message and "TFBN_DATA_DIR" in message
    assert isinstance(info.value, ValueError)
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.*missing"):
        data.load_fashion_mnist(data_dir=folder, tfds_dir=tfds_dir)
    _assert_nothing_prepared(tfds_dir)


def test_missing_folder_from_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("TFBN_DATA_DIR", str(tmp_path / "nowhere"))
    assert data.resolve_data_dir() == tmp_path / "nowhere"
    assert data.resolve_data_dir(tmp_path) == tmp_path  # the argument wins over the variable
    with pytest.raises(data.DataError, match="nowhere.*does not exist.*apt-get install"):
        data.check_data_dir()


def test_a_file_as_data_folder_is_named_as_not_a_folder(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0\n")
    with pytest.raises(data.DataError) as info:
        data.check_data_dir(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}: not a folder (expected the folder holding the Fashion-MNIST"
    )
    assert "does not exist" not in message


def _truncated(name):
    return (SOURCE / name).read_bytes()[:100_000]


def _one_label_changed(name):
    content = bytearray(gzip.decompress((SOURCE / name).read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: same header, same size
    return gzip.compress(bytes(content), 9)


@pytest.mark.parametrize(
    "name, damage, match",
    [
        ("t10k-images-idx3-ubyte.gz", _truncated, "t10k-images-idx3-ubyte.gz is corrupt"),
        (
            "t10k-labels-idx1-ubyte.gz",
            _one_label_changed,
            "t10k-labels-idx1-ubyte.gz is corrupt.*SHA-256",
        ),
    ],
)
def test_damaged_content_raises_data_error_before_preparing(tmp_path, name, damage, match):
    folder = _folder_with(tmp_path, replace={name: damage(name)})
    data.check_data_dir(folder)  # the header is intact: only the full check can tell
    tfds_dir = tmp_path / "tfds"
    with pytest.raises(data.DataError, match=match):
        data.load_fashion_mnist(data_dir=folder, tfds_dir=tfds_dir)
    _assert_nothing_prepared(tfds_dir)


def test_wrong_header_caught_by_cheap_check(tmp_path):
    content = bytearray(gzip.decompress((SOURCE / "train-labels-idx1-ubyte.gz").read_bytes()))
    content[3] = 3  # magic 0x803 (images) where labels (0x801) are expected
    folder = _folder_with(
        tmp_path, replace={"train-labels-idx1-ubyte.gz": gzip.compress(bytes(content), 1)}
    )
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz is corrupt.*magic"):
        data.check_data_dir(folder)


def test_uncompressed_files_accepted(tmp_path, raw):
    folder = tmp_path / "plain"
    folder.mkdir()
    for spec in data.IDX_FILES.values():
        with gzip.open(SOURCE / f"{spec.name}.gz") as source, open(folder / spec.name, "wb") as out:
            shutil.copyfileobj(source, out)
    assert data.check_data_dir(folder) == folder
    labels = data.read_idx(folder / "t10k-labels-idx1-ubyte", data.IDX_FILES["test_labels"])
    np.testing.assert_array_equal(labels, raw["test"][1])


# ----------------------------------------------------------------------------------- shuffling
def test_examples_reshuffled_each_epoch_reproducibly(tfds_dir):
    loaded = data.load_fashion_mnist(64, tfds_dir=tfds_dir, seed=7, train_fraction=0.05)
    assert loaded.num_train == 3000 and loaded.steps_per_epoch == 47
    # Known lengths (Keras's progress bar and epoch end rely on them).
    assert int(loaded.train_for_epoch(0).cardinality()) == 47
    assert int(loaded.train.cardinality()) == 47
    assert int(loaded.train_epochs(2, 5).cardinality()) == 3 * 47
    assert int(loaded.test.cardinality()) == 157  # 10000 / 64, rounded up
    epochs = [_collect(loaded.train_for_epoch(k)) for k in range(2)]
    keys = [_keys(*epoch) for epoch in epochs]
    # Each epoch is a permutation of the same examples, in a different order.
    assert collections.Counter(keys[0]) == collections.Counter(keys[1])
    assert keys[0] != keys[1]
    # Examples are shuffled, not whole batches: the first batch of epoch 1 is not a batch of
    # epoch 0 (a batch-level shuffle would keep batches intact).
    first = set(keys[1][:64])
    best_overlap = max(len(first & set(keys[0][i : i + 64])) for i in range(0, 3000, 64))
    assert best_overlap < 16
    # Same (seed, epoch) from a fresh pipeline: identical batches, as after a restart.
    again = data.load_fashion_mnist(64, tfds_dir=tfds_dir, seed=7, train_fraction=0.05)
    images, labels = _collect(again.train_for_epoch(1))
    np.testing.assert_array_equal(labels, epochs[1][1])
    np.testing.assert_array_equal(images, epochs[1][0])
    # The epochs back to back, for Model.fit with initial_epoch.
    _, labels = _collect(again.train_epochs(0, 2))
    np.testing.assert_array_equal(labels, np.concatenate([epochs[0][1], epochs[1][1]]))
    # Another seed, another order.
    other = data.load_fashion_mnist(64, tfds_dir=tfds_dir, seed=8, train_fraction=0.05)
    assert not np.array_equal(_collect(other.train_for_epoch(1))[1], epochs[1][1])


def test_train_dataset_reshuffles_at_every_pass(tfds_dir):
    loaded = data.load_fashion_mnist(128, tfds_dir=tfds_dir, seed=3, train_fraction=0.05)
    passes = [_keys(*_collect(loaded.train)) for _ in range(2)]
    assert collections.Counter(passes[0]) == collections.Counter(passes[1])
    assert passes[0] != passes[1]
    unshuffled = data.load_fashion_mnist(
        128, tfds_dir=tfds_dir, seed=3, train_fraction=0.05, shuffle=False
    )
    first, second = (_keys(*_collect(unshuffled.train)) for _ in range(2))
    assert first == second and collections.Counter(first) == collections.Counter(passes[0])
    assert _keys(*_collect(unshuffled.train_for_epoch(4))) == first


def test_drop_remainder_gives_full_batches_and_train_examples_every_example(tfds_dir):
    loaded = data.load_fashion_mnist(
        64, tfds_dir=tfds_dir, seed=7, train_fraction=0.05, drop_remainder=True
    )
    keeping = data.load_fashion_mnist(64, tfds_dir=tfds_dir, seed=7, train_fraction=0.05)
    assert loaded.num_train == 3000 and loaded.steps_per_epoch == 46  # 3000 // 64
    assert loaded.examples_per_epoch == 2944 and keeping.examples_per_epoch == 3000
    assert int(loaded.train_for_epoch(0).cardinality()) == 46
    assert int(loaded.train.cardinality()) == 46
    assert int(loaded.train_epochs(1, 3).cardinality()) == 2 * 46
    all_keys = collections.Counter(_keys(*_collect(keeping.train_for_epoch(0))))
    left_out = []
    for epoch in range(2):
        images, labels = _collect(loaded.train_for_epoch(epoch))
        sizes = [int(b[1].shape[0]) for b in loaded.train_for_epoch(epoch)]
        assert sizes == [64] * 46
        keys = collections.Counter(_keys(images, labels))
        # The same permutation as without dropping, less its last 3000 - 46 * 64 = 56 examples.
        np.testing.assert_array_equal(labels, _collect(keeping.train_for_epoch(epoch))[1][:2944])
        assert not keys - all_keys
        left_out.append(all_keys - keys)
    assert sum(left_out[0].values()) == 56 and left_out[0] != left_out[1]
    _, labels = _collect(loaded.train_epochs(0, 2))
    assert labels.shape == (2 * 2944,)
    # Validation/test/train_examples keep every example, in file order.
    images, labels = _collect(loaded.train_examples)
    assert collections.Counter(_keys(images, labels)) == all_keys
    assert [int(b[1].shape[0]) for b in loaded.train_examples][-1] == 3000 - 46 * 64
    assert int(loaded.test.cardinality()) == 157
    # Fewer examples than a batch: one short batch rather than none.
    tiny = data.load_fashion_mnist(
        4096, tfds_dir=tfds_dir, train_fraction=0.05, drop_remainder=True, seed=1
    )
    assert tiny.steps_per_epoch == 1 and len(_collect(tiny.train_for_epoch(0))[1]) == 3000
    assert tiny.examples_per_epoch == 3000


# -------------------------------------------------------------------------------------- splits
def test_validation_held_out_of_training_set(tfds_dir, raw):
    loaded = data.load_fashion_mnist(
        1000, tfds_dir=tfds_dir, validation_fraction=0.1, seed=5, shuffle=False
    )
    assert (loaded.num_train, loaded.num_validation, loaded.num_test) == (54000, 6000, 10000)
    train = _keys(*_collect(loaded.train))
    validation = _keys(*_collect(loaded.validation))
    assert (len(train), len(validation)) == (54000, 6000)
    # Together they are exactly the training split, each example once: a disjoint partition.
    everything = _keys(raw["train"][0][..., None] / 255.0, raw["train"][1])
    assert collections.Counter(train) + collections.Counter(validation) == collections.Counter(
        everything
    )
    # Deterministic given the seed; another seed holds out other examples.
    same = data.load_fashion_mnist(1000, tfds_dir=tfds_dir, validation_fraction=0.1, seed=5)
    assert _keys(*_collect(same.validation)) == validation
    other = data.load_fashion_mnist(1000, tfds_dir=tfds_dir, validation_fraction=0.1, seed=6)
    assert _keys(*_collect(other.validation)) != validation


def test_train_fraction_takes_a_subset_outside_validation(tfds_dir):
    loaded = data.load_fashion_mnist(
        500, tfds_dir=tfds_dir, validation_fraction=0.2, train_fraction=0.25, seed=1
    )
    assert (loaded.num_train, loaded.num_validation) == (12000, 12000)
    train = set(_keys(*_collect(loaded.train)))
    validation = set(_keys(*_collect(loaded.validation)))
    assert len(train) > 11900  # a few images of Fashion-MNIST are duplicates
    assert len(train & validation) < 10


# ----------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -5}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"validation_fraction": -0.1}, "validation_fraction"),
        ({"validation_fraction": "0.1"}, "validation_fraction"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"train_fraction": 1.5}, "train_fraction"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error_before_loading(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        data.load_fashion_mnist(data_dir=tmp_path / "absent", tfds_dir=tmp_path / "tfds", **kwargs)
    assert not isinstance(info.value, data.DataError)
    assert not (tmp_path / "tfds").exists()


def test_bad_epoch_arguments(tfds_dir):
    loaded = data.load_fashion_mnist(100, tfds_dir=tfds_dir, train_fraction=0.01)
    with pytest.raises(ValueError, match="`epoch`"):
        loaded.train_for_epoch(-1)
    with pytest.raises(ValueError, match="`initial_epoch`"):
        loaded.train_epochs(3, 2)
    with pytest.raises(ValueError, match="`batches`"):
        data.pipeline_rate(loaded.test, batches=0)


def test_pipeline_rate_counts_examples(tfds_dir):
    loaded = data.load_fashion_mnist(250, tfds_dir=tfds_dir, train_fraction=0.1)
    rate = data.pipeline_rate(loaded.train, batches=30)
    assert np.isfinite(rate) and rate > 0
