"""The chapter's training recipe and the workflow's names, in one place for the CLI, the notebook
and the tests.

This module imports nothing heavy (no TensorFlow): the command line reads its defaults and choices
from here before it decides whether TensorFlow is needed at all.
"""

from __future__ import annotations

import dataclasses

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NORMS: tuple[str, ...] = ("tfbn", "keras", "none")
STRATEGIES: tuple[str, ...] = ("auto", "default", "one_device", "mirrored", "multi_worker")
LOOPS: tuple[str, ...] = ("auto", "fit", "custom")
TUNERS: tuple[str, ...] = ("random", "bayesian", "hyperband")
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "TFBN_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Hyperparameters of the chapter's LeNet experiment.

    Attributes:
        learning_rate: SGD learning rate for LeNet with batch normalization.
        plain_learning_rate: SGD learning rate for LeNet without normalization.
        epochs: Number of passes over the training set.
        batch_size: Global batch size (split across replicas).
        momentum: Momentum of the BatchNorm moving averages.
        epsilon: Variance epsilon of BatchNorm.
        drop_remainder: Whether each training epoch leaves out the short last batch of its
            permutation (96 examples at batch 256), so that every step normalizes a full batch.
            The examples left out differ from epoch to epoch. With the short batch kept, it is
            always an epoch's last step, right before the evaluation: over six seeds its
            normalization from 96 examples made the test accuracy at lr 1.0 swing more.
    """

    learning_rate: float = 1.0
    plain_learning_rate: float = 0.9
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    epsilon: float = 1e-5
    drop_remainder: bool = True

    def lr_for(self, norm: str) -> float:
        """The default learning rate for a LeNet variant (`"tfbn"`, `"keras"` or `"none"`)."""
        return self.plain_learning_rate if norm == "none" else self.learning_rate


RECIPE = Recipe()
