"""Tools that work on whole Keras models holding batch norms.

`conversion` (Keras's layers to tfbn's), `recalibration` (population statistics on the user's
data), `folding` (batch norms into the layer before them) and `export` (a verified inference
SavedModel). Each takes a model and data; none knows about LeNet or Fashion-MNIST.
"""

# Keras first: its import imports tfbn's library (`tfbn.LIBRARY_MODULES`), modules of this package
# among them, which must not find a module here half-imported.
import keras  # noqa: F401
