"""tfbn.legacy (the tf-keras layer): its cases run in a separate Python process, and tfbn itself
must import and work when tf-keras is missing."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output


def test_legacy_layer_matches_tf_keras_in_its_own_process():
    """tests/legacy_cases.py: tfbn.legacy.BatchNorm against tf_keras.layers.BatchNormalization
    (every constructor argument, fit, MirroredStrategy, saving), without this suite's conftest."""
    code, output = _run(
        [
            "-m",
            "pytest",
            str(ROOT / "tests" / "legacy_cases.py"),
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        timeout=900,
    )
    assert code == 0, output[-8000:]
    assert " passed" in output and "failed" not in output, output[-2000:]


def test_tfbn_imports_without_tf_keras():
    """With tf_keras unimportable, `import tfbn` and tfbn.BatchNorm work, and `import
    tfbn.legacy` fails with an ImportError that says how to install it."""
    script = (
        "import sys\n"
        "sys.modules['tf_keras'] = None\n"
        "import tensorflow as tf, tfbn\n"
        "y = tfbn.BatchNorm()(tf.ones((4, 3)), training=True)\n"
        "assert y.shape == (4, 3)\n"
        "try:\n"
        "    import tfbn.legacy\n"
        "except ImportError as error:\n"
        "    assert 'pip install tfbn[legacy]' in str(error), error\n"
        "    print('LEGACY-IMPORT-ERROR-OK')\n"
    )
    code, output = _run(["-c", script], timeout=300)
    assert code == 0, output[-4000:]
    assert "LEGACY-IMPORT-ERROR-OK" in output
