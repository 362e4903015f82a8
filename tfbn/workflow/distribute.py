"""Choosing a tf.distribute strategy by name, alike for training, tuning and recalibration."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from tfbn.workflow.config import STRATEGIES

__all__ = ["STRATEGIES", "device_description", "get_strategy", "is_chief", "resolve_strategy_name"]


def _tf_config_workers() -> int:
    config = json.loads(os.environ.get("TF_CONFIG", "") or "{}")
    return len(config.get("cluster", {}).get("worker", []))


def resolve_strategy_name(name: str = "auto") -> str:
    """The concrete strategy name `name` stands for on this machine.

    `"auto"` is `"multi_worker"` when `TF_CONFIG` names two or more workers, `"mirrored"` with
    two or more visible GPUs, `"one_device"` with one GPU, else `"default"`.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Argument `strategy` must be one of {STRATEGIES}; received {name!r}.")
    if name != "auto":
        return name
    if _tf_config_workers() > 1:
        return "multi_worker"
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return "mirrored"
    if len(gpus) == 1:
        return "one_device"
    return "default"


def get_strategy(name: str = "auto", devices: list[str] | None = None) -> tf.distribute.Strategy:
    """Creates the tf.distribute strategy called `name` (see `resolve_strategy_name`).

    Args:
        name: `"auto"`, `"default"`, `"one_device"`, `"mirrored"` or `"multi_worker"`.
        devices: For `"mirrored"`, the devices to mirror over (default: all GPUs, or the CPU when
            there is none); for `"one_device"`, the first entry is the device.

    Returns:
        A `tf.distribute.Strategy`. `"multi_worker"` reads the cluster from `TF_CONFIG`.
    """
    name = resolve_strategy_name(name)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        device = devices[0] if devices else (gpus[0].name if gpus else "/cpu:0")
        return tf.distribute.OneDeviceStrategy(device)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.MultiWorkerMirroredStrategy()


def device_description(strategy: tf.distribute.Strategy) -> str:
    """A short description of where a strategy computes, e.g. `/GPU:0` or `2 x /CPU`."""
    try:
        devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    except RuntimeError:
        # The default strategy has no device list: it runs where TensorFlow places ops.
        devices = []
    if not devices:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [gpus[0].name if gpus else "/device:CPU:0"]
    short = [d.split("device:")[-1] for d in devices]
    if len(short) == 1:
        return "/" + short[0]
    return f"{len(short)} replicas (" + ", ".join("/" + s for s in short) + ")"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the shared outputs (checkpoints, logs, exports).

    Every process is the chief except under `MultiWorkerMirroredStrategy`, where the chief is the
    task of type `"chief"`, or worker 0 when the cluster has no chief task.

    Args:
        strategy: The strategy the process trains under.

    Returns:
        `True` for the process that should write the run's files.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return True
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None)
    if task_type in (None, "chief"):
        return True
    cluster = resolver.cluster_spec().as_dict()
    return task_type == "worker" and not cluster.get("chief") and task_id in (None, 0)
