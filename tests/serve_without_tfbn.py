"""Loads SavedModels and runs their signatures in a process where `tfbn` cannot be imported.

Usage: python serve_without_tfbn.py IMAGES.npy OUT.npz MODEL_DIR...

IMAGES.npy holds uint8 images (n, 28, 28), or float32 inputs of any shape, which only the
`serving_float` signature is given (as they are). For each MODEL_DIR (index i) OUT.npz receives the
outputs of every signature: `{i}/{signature}/{output}`, and `{i}/signatures`, the names present.
`tfbn` is blocked: importing it raises ImportError (exit status 3 if it can be imported anyway).
"""

import importlib.abc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BLOCKED = ("tfbn",)


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked in this process")
        return None


def _plain(array):
    """Byte strings as a unicode array: .npz files cannot hold object arrays without pickle."""
    if array.dtype == object:
        return array.astype(bytes).astype(str)
    return array


def main(argv):
    sys.meta_path.insert(0, _Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    try:
        import tfbn  # noqa: F401
    except ImportError:
        pass
    else:
        return 3

    import numpy as np
    import tensorflow as tf

    images_path, out_path, *model_dirs = argv
    images = np.load(images_path)
    results = {}
    for i, model_dir in enumerate(model_dirs):
        loaded = tf.saved_model.load(model_dir)
        results[f"{i}/signatures"] = np.array(sorted(loaded.signatures))
        inputs = {
            "serving_default": images[..., None],
            "serving_uint8_2d": images,
            "serving_float": images[..., None].astype(np.float32) / np.float32(255.0),
        }
        if images.dtype == np.float32:
            inputs = {"serving_float": images}
        for signature, batch in inputs.items():
            outputs = loaded.signatures[signature](images=tf.constant(batch))
            for key, value in outputs.items():
                results[f"{i}/{signature}/{key}"] = _plain(value.numpy())
        if hasattr(loaded, "class_names"):  # exported with class names
            results[f"{i}/class_names"] = _plain(loaded.class_names.numpy())
    if any(name.split(".")[0] in BLOCKED for name in sys.modules):
        return 3
    np.savez(out_path, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
