"""Per-channel sums: the layouts the batch statistics are reduced in, and how they are summed.

Every kernel (`tfbn.ops.kernels`), the public `tfbn.moments` and ghost batches take their statistics
through one `ChannelLayout`: a reshaped view of the input (no transpose) with a function that sums
a view-shaped tensor per channel and one that broadcasts per-channel values against it.

No float32 accumulator receives more than about `2 * BLOCK_ROWS` values (for up to
`BLOCK_ROWS ** 2` rows): a long running sum loses the low bits of every addend
(docs/benchmarks/statistics.md). Outside XLA the rows are
summed in blocks by one matrix-vector product; reductions over the contiguous last axis are left
to TensorFlow, which sums them pairwise. Under XLA the rows are summed in blocks of
`XLA_BLOCK_ROWS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from tfbn.ops.engine import tensorflow_module

tf = tensorflow_module(__name__)

__all__ = [
    "BLOCK_ROWS",
    "ChannelLayout",
    "XLA_BLOCK_ROWS",
    "channel_lanes",
    "channel_layout",
    "column_sums",
    "element_count",
    "first_values",
    "in_xla_context",
    "xla_channel_sums",
]

# Rows one accumulator of `column_sums` receives, at most (about; see `column_sums`).
BLOCK_ROWS = 1024
# Rows summed per block by `xla_channel_sums`.
XLA_BLOCK_ROWS = 32
# Channels-last inputs pack consecutive positions into rows of at least this many values.
LANE_WIDTH = 256


def in_xla_context() -> bool:
    """Whether the graph being traced is compiled by XLA (`tf.function(jit_compile=True)`)."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - TensorFlow moved its internals
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))


def element_count(x: tf.Tensor, axis: int, dtype: tf.DType) -> tf.Tensor:
    """The number of values per channel of `x` (channel axis `axis`), as a `(channels,)` tensor."""
    channels = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
    per_channel = tf.size(x, out_type=tf.int64) // tf.cast(tf.maximum(channels, 1), tf.int64)
    return tf.fill([channels], tf.cast(per_channel, dtype))


def first_values(x: tf.Tensor, axis: int) -> tf.Tensor:
    """The first value of every channel (index 0 on every other axis), `(channels,)`; 0 when `x`
    is empty. The pivot the statistics are shifted by."""
    rank = x.shape.rank
    head = x[tuple(slice(None) if i == axis else slice(0, 1) for i in range(rank))]
    return tf.reduce_sum(head, [i for i in range(rank) if i != axis])


def column_sums(t: tf.Tensor) -> tf.Tensor:
    """Sums over the rows of a 2-D tensor `(rows, width)`, outside XLA, accurate in float32.

    The rows are cut into `b = max(1, rows // BLOCK_ROWS)` interleaved groups: the matrix-vector
    product `ones @ t.reshape(rows // b, b * width)` (which runs near the memory bandwidth, where
    TensorFlow's reduction over the rows of a tall matrix runs at about a third of it) gives every
    column of every group with at most `2 * BLOCK_ROWS` additions per accumulator, then the `b`
    groups and the last `rows % b` rows are added.
    """
    width = t.shape[1] if t.shape[1] is not None else tf.shape(t)[1]
    rows = tf.shape(t)[0]
    groups = tf.maximum(rows // BLOCK_ROWS, 1)
    blocks = rows // groups
    main = blocks * groups
    head = tf.reshape(t[:main], [blocks, -1])
    sums = tf.matmul(tf.ones([1, blocks], t.dtype), head)[0]
    sums = tf.reduce_sum(tf.reshape(sums, [-1, width]), 0)
    if t.shape[0] is not None and t.shape[0] < BLOCK_ROWS * 2:
        return sums  # one group: no rows left over
    return sums + tf.reduce_sum(t[main:], 0)


def _optimization_barrier():
    """XLA's `OptimizationBarrier` as a TensorFlow op, or `None` where this TensorFlow lacks it."""
    try:
        from tensorflow.compiler.tf2xla.python import xla
    except ImportError:  # pragma: no cover - TensorFlow moved its internals
        return None
    return getattr(xla, "optimization_barrier", None)


def xla_channel_sums(x: tf.Tensor) -> tf.Tensor:
    """Sums over every axis but the last, in two stages that XLA compiles well (and accurately).

    XLA's CPU compiler does not fuse an elementwise producer (`dy * centred`, `(x - mean)**2`) into
    a reduction over the leading axis of a tall tensor: it writes the product to memory and reads
    it back. It does fuse the producer into a reduction over the second axis of
    `(rows / 32, 32, ...)`. So the rows are summed in blocks of `XLA_BLOCK_ROWS` (those that do
    not fill a block are summed apart) and the block sums are summed after an optimization
    barrier, without which XLA merges the two stages back into one reduction.
    """
    rank = x.shape.rank
    rest = list(range(rank - 1))
    barrier = _optimization_barrier()
    inner = x.shape[1:].as_list()
    rows = x.shape[0]
    block = XLA_BLOCK_ROWS
    if barrier is None or None in inner or (rows is not None and rows < 2 * block):
        return tf.reduce_sum(x, rest)
    # Under XLA the row count is known when compiling, so these slices are static.
    n_rows = tf.shape(x)[0]
    main = n_rows - tf.math.floormod(n_rows, block)
    blocks = tf.reduce_sum(tf.reshape(x[:main], [-1, block, *inner]), 1)
    total = tf.reduce_sum(barrier(blocks)[0], rest)
    if rows is not None and rows % block == 0:
        return total
    return total + tf.reduce_sum(x[main:], rest)


def channel_lanes(shape, channels: int) -> int:
    """How many positions per row the 2-D view of a channels-last input packs.

    Reductions over the rows of a wide matrix are several times faster than over the leading axes
    of a rank-4 tensor, in TensorFlow's CPU kernels and under XLA. This is the smallest divisor `k`
    of the product of the static inner dimensions (all but the batch and the channel axis) with
    `k * channels >= 256`, else that product itself; 1 for rank-2 inputs, for 256 or more channels,
    or when an inner dimension is unknown.
    """
    shape = tf.TensorShape(shape)
    inner_dims = shape[1:-1].as_list() if shape.rank is not None else [None]
    if not channels or channels >= LANE_WIDTH or any(d is None for d in inner_dims):
        return 1
    inner = 1
    for d in inner_dims:
        inner *= d
    for k in range(1, inner + 1):
        if inner % k == 0 and k * channels >= LANE_WIDTH:
            return k
    return max(inner, 1)


class ChannelLayout(NamedTuple):
    """A view of an input for per-channel reductions.

    Attributes:
        view: The input reshaped (never transposed).
        to_view: Reshapes any tensor of the input's shape like `view`.
        sums: Per-channel sums of a tensor of `view`'s shape, `(channels,)`.
        spread: Broadcasts `(channels,)` values against `view`.
    """

    view: tf.Tensor
    to_view: Callable
    sums: Callable
    spread: Callable


def channel_layout(x: tf.Tensor, axis: int, *, xla: bool | None = None) -> ChannelLayout:
    """The layout the statistics of `x` (non-negative channel `axis`) are reduced in.

    - channels last, outside XLA: `(rows, lanes * C)` (`channel_lanes`), summed by `column_sums`
      and folded over the lanes;
    - channels last, under XLA: `(rows, C)` or `(rows, lanes, C)`, summed by `xla_channel_sums`
      (per-channel values then broadcast along the last axis instead of being tiled, which costs
      XLA an index computation per element);
    - any other axis: `(outer, C, inner)`, summed over the contiguous `inner` axis first (the
      `(outer * C, inner)` rows), then over `outer` like a channels-last input.

    `xla=None` asks `in_xla_context()`.
    """
    rank = x.shape.rank
    xla = in_xla_context() if xla is None else xla
    channels = x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]
    if axis != rank - 1:
        inner = tf.reduce_prod(tf.shape(x)[axis + 1 :])

        def to_view(t):
            return tf.reshape(t, [-1, channels, inner])

        def sums(t):
            per_row = tf.reduce_sum(t, 2)
            if xla:
                barrier = _optimization_barrier()
                return tf.reduce_sum(per_row if barrier is None else barrier(per_row)[0], 0)
            return column_sums(per_row)

        return ChannelLayout(to_view(x), to_view, sums, lambda v: tf.reshape(v, [1, -1, 1]))

    lanes = channel_lanes(x.shape, x.shape[-1])
    if xla:
        shape = [-1, channels] if lanes == 1 else [-1, lanes, channels]
        return ChannelLayout(
            tf.reshape(x, shape),
            lambda t: tf.reshape(t, shape),
            xla_channel_sums,
            lambda v: v,
        )

    def to_lanes(t):
        return tf.reshape(t, [-1, lanes * channels])

    def sums(t):
        per_column = column_sums(t)
        return per_column if lanes == 1 else tf.reduce_sum(tf.reshape(per_column, [lanes, -1]), 0)

    def spread(v):
        return v if lanes == 1 else tf.tile(v, [lanes])

    return ChannelLayout(to_lanes(x), to_lanes, sums, spread)
