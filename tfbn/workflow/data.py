"""Fashion-MNIST from local IDX files, through tensorflow-datasets, with no network access.

The four standard IDX files (gzipped or not) in a local folder are prepared once into a TFDS dataset
named `fashion_mnist_local`; later loads read the prepared records. The files are verified by their
decompressed content (IDX magic numbers, shapes and SHA-256), so any faithful copy works, whatever
compressor made it: Debian's `dataset-fashion-mnist` recompresses the upstream files, and the
upstream `.gz` checksums registered for TFDS's own `fashion_mnist` do not match them.

The input pipeline (`load_fashion_mnist`) keeps each split decoded and scaled in memory and draws
batches of a fresh permutation of the examples each epoch. The permutation of epoch `k` is a
function of `(seed, k)` alone (`FashionMNIST.train_for_epoch`), so a run restarted at epoch `k`
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tfbn.utils.arguments import check_count
from tfbn.workflow import config
from tfbn.workflow.config import CLASS_NAMES

__all__ = [
    "DEFAULT_DATA_DIR",
    "DataError",
    "FashionMNIST",
    "FashionMnistLocal",
    "is_prepared",
    "IDX_FILES",
    "check_data_dir",
    "load_fashion_mnist",
    "pipeline_rate",
    "prepare",
    "read_idx",
    "resolve_data_dir",
]

DEFAULT_DATA_DIR = Path(config.DEFAULT_DATA_DIR)
DATA_DIR_ENV = config.DATA_DIR_ENV
DATASET_NAME = "fashion_mnist_local"

IMAGE_SHAPE = (28, 28, 1)
# The IDX type byte: unsigned bytes, and the names of the others.
_IDX_UBYTE = 0x08
_IDX_TYPES = {0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


@dataclasses.dataclass(frozen=True)
class IdxFile:
    """What one of the four IDX files must contain."""

    name: str
    magic: int
    shape: tuple[int, ...]
    sha256: str

    @property
    def num_bytes(self) -> int:
        return 4 + 4 * len(self.shape) + int(np.prod(self.shape))


# Magic 0x00000803: unsigned bytes, 3 dimensions; 0x00000801: unsigned bytes, 1 dimension.
IDX_FILES: dict[str, IdxFile] = {
    "train_images": IdxFile(
        "train-images-idx3-ubyte",
        0x803,
        (60000, 28, 28),
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train_labels": IdxFile(
        "train-labels-idx1-ubyte",
        0x801,
        (60000,),
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test_images": IdxFile(
        "t10k-images-idx3-ubyte",
        0x803,
        (10000, 28, 28),
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test_labels": IdxFile(
        "t10k-labels-idx1-ubyte",
        0x801,
        (10000,),
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}
_SPLIT_FILES = {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels")}

_HOW_TO_GET = (
    "Install the data with `apt-get install dataset-fashion-mnist` (it puts the four files in "
    f"{DEFAULT_DATA_DIR}), or set {DATA_DIR_ENV} or --data-dir to a folder holding "
    + ", ".join(f"{spec.name}.gz" for spec in IDX_FILES.values())
    + " (gzipped or not)."
)


class DataError(ValueError):
    """Fashion-MNIST files are missing or do not hold the expected content.

    The message names the file and says how to get the data.
    """


# ------------------------------------------------------------------------------------ the files
def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder the IDX files are read from.

    Args:
        data_dir: Explicit folder; when `None`, the `TFBN_DATA_DIR` environment variable, and
            when that is unset or empty, `/usr/share/datasets/fashion-mnist` (Debian's
            `dataset-fashion-mnist`).

    Returns:
        The folder as a `Path` (not checked; see `check_data_dir`).
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _find_file(folder: Path, spec: IdxFile) -> Path:
    for candidate in (folder / f"{spec.name}.gz", folder / spec.name):
        if candidate.is_file():
            return candidate
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"{folder}: not a folder (expected the folder holding the Fashion-MNIST files, "
            f"e.g. {DEFAULT_DATA_DIR})."
        )
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST folder {folder} does not exist. {_HOW_TO_GET}")
    raise DataError(
        f"Fashion-MNIST file {folder / (spec.name + '.gz')} is missing (neither "
        f"{spec.name}.gz nor {spec.name} is in {folder}). {_HOW_TO_GET}"
    )


def _open(path: Path):
    # Gzipped or not by its content, whatever its name says.
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read(path: Path, spec: IdxFile | None, size: int = -1) -> bytes:
    """The first `size` bytes of an IDX file, decompressed (all with -1).

    Raises:
        DataError: if the content cannot be decompressed (a damaged or truncated file).
        OSError: if the file cannot be read (permission, I/O error), naming the file.
    """
    try:
        with _open(path) as f:
            return f.read(size)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise _corrupt(path, f"it cannot be decompressed ({error})", spec) from None
    except OSError as error:
        if error.filename is None:
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from None
        raise


def _corrupt(path: Path, why: str, spec: IdxFile | None = None) -> DataError:
    if spec is None:
        return DataError(f"IDX file {path} is corrupt: {why}.")
    return DataError(f"Fashion-MNIST file {path} is corrupt: {why}. {_HOW_TO_GET}")


def _check_header(path: Path, header: bytes, spec: IdxFile) -> None:
    ndim = len(spec.shape)
    if len(header) < 4 + 4 * ndim:
        raise _corrupt(path, f"it holds only {len(header)} bytes, shorter than an IDX header", spec)
    magic = struct.unpack(">i", header[:4])[0]
    if magic != spec.magic:
        raise _corrupt(
            path,
            f"IDX magic number is {magic:#010x}, expected {spec.magic:#010x} for {spec.name}",
            spec,
        )
    shape = struct.unpack(f">{ndim}i", header[4 : 4 + 4 * ndim])
    if tuple(shape) != spec.shape:
        raise _corrupt(path, f"IDX shape is {tuple(shape)}, expected {spec.shape}", spec)


def _header_shape(path: Path, raw: bytes) -> tuple[int, ...]:
    """The shape an IDX file of unsigned bytes declares (any number of dimensions)."""
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DataError(f"{path} is not an IDX file: it does not start with an IDX magic number.")
    kind, ndim = raw[2], raw[3]
    if kind != _IDX_UBYTE:
        kind_name = _IDX_TYPES.get(kind, f"values of unknown type 0x{kind:02X}")
        raise DataError(f"IDX file {path} holds {kind_name}; it must hold unsigned bytes (ubyte).")
    if len(raw) < 4 + 4 * ndim:
        raise _corrupt(path, f"its header is cut short after {len(raw)} bytes")
    return tuple(struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim]))


def check_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Cheaply checks that a folder holds the four Fashion-MNIST IDX files.

    Checks that each file exists and that its IDX header (magic number and shape) is right. It
    reads a few bytes per file; the full content (SHA-256 of the decompressed bytes) is verified
    once, when the dataset is prepared. Call it before any expensive work (the training command
    does) so that missing data fails fast with one clear message.

    Args:
        data_dir: Folder with the files; `None` means `TFBN_DATA_DIR` or the Debian default
            (see `resolve_data_dir`).

    Returns:
        The folder, as a `Path`.

    Raises:
        DataError: (a `ValueError`) naming the first file that is missing or has a wrong header,
            and saying how to get the data.
        OSError: if a file is there but cannot be read (e.g. `PermissionError`), naming it.
    """
    folder = resolve_data_dir(data_dir)
    for spec in IDX_FILES.values():
        path = _find_file(folder, spec)
        _check_header(path, _read(path, spec, 4 + 4 * len(spec.shape)), spec)
    return folder


def read_idx(path: str | os.PathLike, spec: IdxFile | None = None) -> np.ndarray:
    """Reads one IDX file of unsigned bytes (gzipped or not), fully verified against `spec`.

    Args:
        path: The file.
        spec: What it must contain (one of `IDX_FILES`: magic number, shape and SHA-256). `None`
            takes any IDX file of unsigned bytes, in the shape its header declares (e.g. images
            to classify).

    Returns:
        A uint8 array of shape `spec.shape` (or the declared shape).

    Raises:
        DataError: when the file cannot be decompressed, is not an IDX file of unsigned bytes, or
            its header, size or SHA-256 is wrong.
        OSError: if the file cannot be read (e.g. `PermissionError`), naming it.
    """
    path = Path(path)
    raw = _read(path, spec)
    if spec is None:
        shape = _header_shape(path, raw)
    else:
        _check_header(path, raw, spec)
        shape = spec.shape
    offset = 4 + 4 * len(shape)
    if len(raw) != offset + int(np.prod(shape)):
        raise _corrupt(
            path,
            f"it holds {len(raw)} bytes once decompressed, its header declares shape {shape} "
            f"({offset + int(np.prod(shape))} bytes)",
            spec,
        )
    if spec is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != spec.sha256:
            raise _corrupt(
                path,
                f"SHA-256 of the decompressed content is {digest}, expected {spec.sha256}",
                spec,
            )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def read_split(data_dir: str | os.PathLike | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads and verifies one split's images `(n, 28, 28)` and labels `(n,)`, both uint8.

    Raises:
        DataError: when a file is missing or corrupt.
    """
    folder = resolve_data_dir(data_dir)
    images_key, labels_key = _SPLIT_FILES[split]
    images = read_idx(_find_file(folder, IDX_FILES[images_key]), IDX_FILES[images_key])
    labels = read_idx(_find_file(folder, IDX_FILES[labels_key]), IDX_FILES[labels_key])
    return images, labels


# ------------------------------------------------------------------------------- the TFDS builder
class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of `fashion_mnist_local`: Fashion-MNIST from four IDX files in `manual_dir`.

    Every file is verified by its decompressed content (IDX header, size, SHA-256) before any
    example is written. Features: `image` (uint8, `(28, 28, 1)`), `label` (`ClassLabel` with
    `tfbn.CLASS_NAMES`). Splits: `train` (60,000) and `test` (10,000), stored in the files' order.

    Usage without `load_fashion_mnist`:

    ```python
    import tensorflow_datasets as tfds
    import tfbn.workflow.data  # registers the builder

    ds = tfds.load(
        "fashion_mnist_local",
        split="train",
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(
                manual_dir="/usr/share/datasets/fashion-mnist"
            )
        },
    )
    ```
    """

    # Bump whenever the stored record format changes: TFDS reuses a prepared copy of a version.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Prepared from local IDX files, verified by content (PNG-encoded images).",
        "1.1.0": "Images stored as raw uint8 tensors (faster to prepare and to read).",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = _HOW_TO_GET

    def _info(self):
        return self.dataset_info_from_configs(
            description=(
                "Fashion-MNIST (Xiao et al., 2017): 28x28 grayscale images of 10 kinds of "
                "clothing, 60,000 for training and 10,000 for testing."
            ),
            features=tfds.features.FeaturesDict(
                {
                    # Raw bytes rather than PNG: an order of magnitude faster to write and to
                    # decode, for records barely larger.
                    "image": tfds.features.Tensor(
                        shape=IMAGE_SHAPE, dtype=np.uint8, encoding="bytes"
                    ),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            # Keep the files' order, so that record i of a split is example i of its IDX file.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        folder = Path(dl_manager.manual_dir)
        arrays = {split: read_split(folder, split) for split in _SPLIT_FILES}
        return {
            split: self._generate_examples(images, labels)
            for split, (images, labels) in arrays.items()
        }

    def _generate_examples(self, images, labels):
        for index in range(len(labels)):
            yield index, {"image": images[index][..., None], "label": int(labels[index])}


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # TFDS warns about a missing dataset_info.json while it probes a folder not prepared yet.
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Several processes (multi-worker training, tuner workers) may load at once; one prepares.
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_prepared(tfds_dir: str | os.PathLike | None = None) -> bool:
    """Whether `fashion_mnist_local` is already prepared in `tfds_dir` (then no IDX file is read).

    Args:
        tfds_dir: TFDS data directory; `None` means TFDS's default.

    Returns:
        `True` if `load_fashion_mnist(tfds_dir=tfds_dir)` needs no source files.
    """
    with _quiet_absl():
        builder = FashionMnistLocal(data_dir=None if tfds_dir is None else os.fspath(tfds_dir))
    return builder.is_prepared()


def prepare(
    data_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
):
    """Prepares `fashion_mnist_local` in `tfds_dir` if it is not there yet, and returns its builder.

    Args:
        data_dir: Folder with the IDX files (see `resolve_data_dir`); only read when the dataset
            is not prepared yet.
        tfds_dir: TFDS data directory; `None` means TFDS's default (`TFDS_DATA_DIR` or
            `~/tensorflow_datasets`).

    Returns:
        The prepared `tfds.core.DatasetBuilder`.

    Raises:
        DataError: when the dataset must be prepared and a file is missing or corrupt.
    """
    tfds_dir = None if tfds_dir is None else os.fspath(tfds_dir)
    with _quiet_absl():
        builder = FashionMnistLocal(data_dir=tfds_dir)
    if builder.is_prepared():
        return builder
    folder = check_data_dir(data_dir)
    lock = Path(builder.data_dir).parent / f".{DATASET_NAME}.lock"
    with _file_lock(lock), _quiet_absl():
        builder = FashionMnistLocal(data_dir=tfds_dir)
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    manual_dir=os.fspath(folder), try_download_gcs=False
                )
            )
    return builder


# ---------------------------------------------------------------------------------- the pipeline
def _epoch_key(seed: int, epoch) -> tf.Tensor:
    """The stateless-RNG key of one epoch's permutation: depends on `(seed, epoch)` only."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def _num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches per pass: full batches only when dropping the remainder (at least one batch)."""
    if drop_remainder and num_examples >= batch_size:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def _batches(
    whole: tf.data.Dataset,
    batch_size: int,
    num_examples: int,
    key: tf.Tensor | None,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches of a whole split (one element), in the order of a permutation keyed by `key`."""
    num_batches = _num_batches(num_examples, batch_size, drop_remainder)

    def split(images, labels):
        if key is None:
            order = tf.range(num_examples, dtype=tf.int64)
        else:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_examples, dtype=tf.int64), seed=key
            )

        def take(i):
            idx = order[i * batch_size : (i + 1) * batch_size]
            return tf.gather(images, idx), tf.gather(labels, idx)

        return tf.data.Dataset.range(num_batches).map(take)

    # Reading the single element with get_single_element runs `whole` to its end, which is when
    # its cache is complete: then even a pipeline stopped after its first batch (a warm-up) has
    # filled the cache.
    dataset = tf.data.Dataset.range(1).flat_map(lambda _: split(*whole.get_single_element()))
    # flat_map hides the length; Keras uses it for its progress bar and to end an epoch.
    return dataset.apply(tf.data.experimental.assert_cardinality(num_batches))


def _finish(dataset: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    # The data come from TFDS record files, but each split is one cached element: sharding by
    # file across workers would be wrong; shard batches instead.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass
class FashionMNIST:
    """Fashion-MNIST as `tf.data` pipelines, from `load_fashion_mnist`.

    Every dataset yields `(images, labels)`: images float32 `[B, 28, 28, 1]` scaled to `[0, 1]`,
    labels int32 `[B]`; the last batch of a pass may be smaller, except in the training epochs
    when `drop_remainder` is set.

    Attributes:
        train: Training batches, reshuffled (per example, over the whole split) at every pass.
            Iterating it again gives the next epoch's order; the sequence is reproducible from a
            fresh process when `seed` is set. For exact resumption use `train_for_epoch`.
        train_examples: Every training example once, in file order (the last batch may be
            smaller): for population statistics (`tfbn.recalibrate`) and evaluation.
        validation: Batches of the examples held out of the training set (fixed order), or
            `None` when `validation_fraction == 0`.
        test: Batches of the test split, in file order. Only for the final evaluation.
        num_train: Number of training examples.
        num_validation: Number of validation examples.
        num_test: Number of test examples.
        class_names: The ten class names, indexed by label.
        batch_size: The batch size.
        seed: The seed of the shuffles and of the validation hold-out (`None`: fresh randomness for
            the shuffles, and seed 0 for the hold-out).
        drop_remainder: Whether training epochs have full batches only (the short last batch of
            each permutation left out).
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset
    num_train: int
    num_validation: int
    num_test: int
    class_names: tuple[str, ...]
    batch_size: int
    seed: int | None = None
    drop_remainder: bool = False
    train_examples: tf.data.Dataset | None = None
    _train_whole: tf.data.Dataset | None = dataclasses.field(default=None, repr=False)
    _epoch_seed: int = dataclasses.field(default=0, repr=False)
    _shuffle: bool = dataclasses.field(default=True, repr=False)

    @property
    def steps_per_epoch(self) -> int:
        """Number of training batches per epoch."""
        return _num_batches(self.num_train, self.batch_size, self.drop_remainder)

    @property
    def examples_per_epoch(self) -> int:
        """Number of training examples in an epoch (fewer than `num_train` when dropping)."""
        return min(self.num_train, self.steps_per_epoch * self.batch_size)

    def train_for_epoch(self, epoch: int) -> tf.data.Dataset:
        """The training batches of epoch `epoch`, in an order that depends on `(seed, epoch)` only.

        Epoch `k` gives the same batches whether the process ran epochs `0..k-1` before or was
        restarted at epoch `k`: use it to resume a training run exactly. With `shuffle=False`
        every epoch is in file order.

        Args:
            epoch: Non-negative epoch index.

        Returns:
            A `tf.data.Dataset` of one epoch of `(images, labels)` batches.

        Raises:
            ValueError: if `epoch` is not a non-negative integer.
        """
        epoch = check_count("epoch", epoch, 0)
        key = _epoch_key(self._epoch_seed, epoch) if self._shuffle else None
        return _finish(
            _batches(self._train_whole, self.batch_size, self.num_train, key, self.drop_remainder)
        )

    def train_epochs(self, initial_epoch: int, epochs: int) -> tf.data.Dataset:
        """The batches of epochs `initial_epoch .. epochs - 1` back to back, as `train_for_epoch`.

        For `Model.fit(data.train_epochs(start, E), epochs=E, initial_epoch=start,
        steps_per_epoch=data.steps_per_epoch)`, which resumes exactly.

        Raises:
            ValueError: unless `0 <= initial_epoch <= epochs`.
        """
        initial_epoch = check_count("initial_epoch", initial_epoch, 0)
        epochs = check_count("epochs", epochs, 0)
        if initial_epoch > epochs:
            raise ValueError(
                f"Argument `initial_epoch` must not exceed `epochs`; received "
                f"initial_epoch={initial_epoch}, epochs={epochs}."
            )
        seed, whole, size, n = self._epoch_seed, self._train_whole, self.batch_size, self.num_train
        shuffle, drop = self._shuffle, self.drop_remainder
        dataset = tf.data.Dataset.range(int(initial_epoch), int(epochs)).flat_map(
            lambda e: _batches(whole, size, n, _epoch_key(seed, e) if shuffle else None, drop)
        )
        total = (int(epochs) - int(initial_epoch)) * self.steps_per_epoch
        return _finish(dataset.apply(tf.data.experimental.assert_cardinality(total)))


def _check_fraction(name: str, value, low_inclusive: bool, high_inclusive: bool) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = (value >= 0.0 if low_inclusive else value > 0.0) and (
            value <= 1.0 if high_inclusive else value < 1.0
        )
    if not ok:
        interval = ("[" if low_inclusive else "(") + "0, 1" + ("]" if high_inclusive else ")")
        raise ValueError(
            f"Argument `{name}` must be a number in {interval}; received {name}={value!r}."
        )
    return value


def _split_indices(
    n: int, validation_fraction: float, train_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted index sets (train, validation) of a split of `n` examples."""
    order = np.random.default_rng(seed).permutation(n)
    num_validation = int(round(validation_fraction * n))
    rest = n - num_validation
    num_train = max(1, int(round(train_fraction * rest)))
    validation = np.sort(order[:num_validation])
    train = np.sort(order[num_validation : num_validation + num_train])
    return train, validation


def _whole_split(builder, split: str, indices: np.ndarray | None) -> tf.data.Dataset:
    """One cached element: the chosen examples of a split, decoded and scaled, in file order."""
    num_examples = builder.info.splits[split].num_examples
    # The builder keeps the files' order (no shuffling), so record i is example i of the IDX
    # file. Parsing all records as one batch is ~10x faster than TFDS's per-record decoding.
    files = [os.fspath(path) for path in builder.info.splits[split].filepaths]
    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
    }
    chosen = None if indices is None else tf.constant(indices, tf.int64)

    def decode(serialized):
        example = tf.io.parse_example(serialized, spec)
        images = tf.reshape(tf.io.decode_raw(example["image"], tf.uint8), (-1, *IMAGE_SHAPE))
        labels = tf.cast(example["label"], tf.int32)
        if chosen is not None:
            images, labels = tf.gather(images, chosen), tf.gather(labels, chosen)
        return tf.cast(images, tf.float32) / 255.0, labels

    dataset = tf.data.TFRecordDataset(files).batch(num_examples).map(decode)
    return dataset.cache()


def _reshuffled_batches(
    whole: tf.data.Dataset, batch_size: int, n: int, epoch_seed: int, drop_remainder: bool
) -> tf.data.Dataset:
    """One epoch of batches from a new permutation at every pass over the dataset.

    The permutation keys follow from `epoch_seed` alone, so a run with a seed repeats its order.
    """
    keys = tf.data.Dataset.random(seed=epoch_seed, rerandomize_each_iteration=True).take(1)
    seed = tf.constant(epoch_seed, tf.int64)
    batches = keys.flat_map(
        lambda r: _batches(whole, batch_size, n, tf.stack([seed, r]), drop_remainder)
    )
    cardinality = _num_batches(n, batch_size, drop_remainder)
    return batches.apply(tf.data.experimental.assert_cardinality(cardinality))


def load_fashion_mnist(
    batch_size: int = 256,
    *,
    data_dir: str | os.PathLike | None = None,
    tfds_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.0,
    train_fraction: float = 1.0,
    seed: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = False,
) -> FashionMNIST:
    """Loads Fashion-MNIST as `tf.data` pipelines, preparing it offline on first use.

    The first call prepares the TFDS dataset `fashion_mnist_local` in `tfds_dir` from the IDX
    files in `data_dir` (a few seconds, content verified by SHA-256); later calls read it back.
    Each split is decoded, scaled to `[0, 1]` and cached in memory on its first pass. Training
    batches are drawn from a fresh permutation of the examples at every epoch.

    Args:
        batch_size: Examples per batch, a positive integer.
        data_dir: Folder with the four IDX files; `None` means the `TFBN_DATA_DIR` environment
            variable, else `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`).
        tfds_dir: TFDS data directory where the prepared dataset is kept; `None` means TFDS's
            default (`TFDS_DATA_DIR` or `~/tensorflow_datasets`).
        validation_fraction: Fraction of the training split held out as the validation set, in
            `[0, 1)`. The held-out examples are chosen by `seed` (seed 0 when `seed` is `None`)
            and never appear in `train`.
        train_fraction: Fraction of the remaining training examples to keep, in `(0, 1]`
            (for quick runs); chosen with the same seed.
        seed: Seed of the shuffles; with a seed, epoch `k`'s order is a function of
            `(seed, k)` (see `FashionMNIST.train_for_epoch`). `None` gives fresh randomness.
        shuffle: If `False`, `train` (and `train_for_epoch`) yield the training examples in file
            order every epoch.
        drop_remainder: If `True`, every training epoch has full batches only: the short last
            batch of each epoch's permutation is left out (other examples at every epoch when
            shuffling). Validation, test and `train_examples` always keep every example.

    Returns:
        A `FashionMNIST` with `train`, `validation`, `test` and the sizes.

    Raises:
        ValueError: for a bad argument (before anything is read).
        DataError: (a `ValueError`) when the dataset is not prepared yet and a file is missing
            or corrupt.
    """
    batch_size = check_count("batch_size", batch_size)
    validation_fraction = _check_fraction("validation_fraction", validation_fraction, True, False)
    train_fraction = _check_fraction("train_fraction", train_fraction, False, True)
    seed = check_count("seed", seed, 0, none=True)
    drop_remainder = bool(drop_remainder)

    builder = prepare(data_dir, tfds_dir)
    num_examples = builder.info.splits["train"].num_examples
    train_idx, validation_idx = _split_indices(
        num_examples, validation_fraction, train_fraction, 0 if seed is None else seed
    )
    if len(train_idx) == num_examples:
        train_whole = _whole_split(builder, "train", None)
    else:
        train_whole = _whole_split(builder, "train", train_idx)
    num_train = len(train_idx)

    epoch_seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**62)
    if shuffle:
        train = _reshuffled_batches(train_whole, batch_size, num_train, epoch_seed, drop_remainder)
    else:
        train = _batches(train_whole, batch_size, num_train, None, drop_remainder)

    validation = None
    if len(validation_idx):
        validation = _finish(
            _batches(
                _whole_split(builder, "train", validation_idx),
                batch_size,
                len(validation_idx),
                None,
            )
        )
    num_test = builder.info.splits["test"].num_examples
    test = _finish(_batches(_whole_split(builder, "test", None), batch_size, num_test, None))
    return FashionMNIST(
        train=_finish(train),
        validation=validation,
        test=test,
        num_train=num_train,
        num_validation=len(validation_idx),
        num_test=num_test,
        class_names=tuple(builder.info.features["label"].names),
        batch_size=batch_size,
        seed=seed,
        drop_remainder=drop_remainder,
        train_examples=_finish(_batches(train_whole, batch_size, num_train, None)),
        _train_whole=train_whole,
        _epoch_seed=epoch_seed,
        _shuffle=bool(shuffle),
    )


# ----------------------------------------------------------------------------------- measurement
def pipeline_rate(dataset: tf.data.Dataset, batches: int = 200, *, warmup: bool = True) -> float:
    """How many examples per second a pipeline delivers (without any model consuming them).

    The first batch is always taken untimed: it starts the pipeline's threads, and for the
    datasets of `load_fashion_mnist` it reads and caches the whole split.

    Args:
        dataset: A finite dataset of `(images, labels)` batches (or bare image batches).
        batches: Number of batches to time; the dataset is repeated if it has fewer.
        warmup: If `True`, one full untimed pass is made first (for pipelines whose caches fill
            over a whole pass).

    Returns:
        Examples per second.

    Raises:
        ValueError: if `batches` is not a positive integer.
    """
    batches = check_count("batches", batches)
    if warmup:
        for _ in dataset:
            pass
    iterator = iter(dataset.repeat())
    next(iterator)
    examples = 0
    start = time.perf_counter()
    for _ in range(int(batches)):
        element = next(iterator)
        first = element[0] if isinstance(element, (tuple, list)) else element
        examples += int(first.shape[0])
    elapsed = time.perf_counter() - start
    return examples / elapsed
