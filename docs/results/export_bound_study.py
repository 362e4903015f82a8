"""How fast an export can get by folding: folded, unfolded, and a copy without batch norm.

For ResNet50 and EfficientNetB0 at `tfbn bench`'s full sizes, converted with `tfbn.convert`:
the folded and the unfolded SavedModel, and one of a clone whose batch norms pass their input
through (no BN at all, the most any folding can reach), timed interleaved in this process at
batch 64 on `serving_float` with the benchmark's own sampler. Prints one JSON line per model.

    python docs/results/export_bound_study.py > docs/results/export_bound.txt
"""

import json
import tempfile
from pathlib import Path

import keras

from tfbn import bench
from tfbn.conversion import convert
from tfbn.export import export_saved_model


class NoBatchNorm(keras.layers.Layer):
    """Stands where a batch norm stood and returns its input."""

    def call(self, inputs, mask=None, training=None):
        return inputs


def _without_batch_norm(layer):
    if "BatchNorm" in type(layer).__name__:
        return NoBatchNorm(name=layer.name)
    return layer.__class__.from_config(layer.get_config())


def main() -> None:
    settings = bench._settings(quick=False, repeats=None, xla=False)
    batch = settings["models_export_batch"]
    for name in ("ResNet50", "EfficientNetB0"):
        model = convert(bench._application(name, bench.MODEL_SIZES[name]))
        bare = keras.models.clone_model(model, clone_function=_without_batch_norm)
        variants = (("folded", model, True), ("unfolded", model, False), ("no_bn", bare, False))
        with tempfile.TemporaryDirectory() as work_dir:
            paths = {
                kind: Path(export_saved_model(m, work_dir, name=f"{name}_{kind}", fold=fold))
                for kind, m, fold in variants
            }
            row = bench._throughput_samples(paths, batch, settings, signature="serving_float")
        rates = {kind: row[kind]["median_examples_per_s"] for kind, _, _ in variants}
        ratios = {kind: rates[kind] / rates["unfolded"] for kind in ("folded", "no_bn")}
        print(json.dumps({"model": name, "batch": batch, "examples_per_s": rates,
                          "ratio_to_unfolded": ratios}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
