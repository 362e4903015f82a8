"""scripts/gpu_check.py, run here on the CPU (`--cpu --quick`) in processes of its own.

The script sets KERAS_BACKEND=jax itself; it runs with TensorFlow made unimportable (a meta-path
finder that refuses `tensorflow`, as on a machine without it). Its layer checks compare against
float64 NumPy references of its own; the test checks that they run and pass on JAX without
TensorFlow, and that every check reports one line.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# The layer cases (7 shapes / options x 2 scales) and the two timed shapes, stated independently.
LAYER_CHECKS = {
    f"layer/{name}/{scale}"
    for name in ("2d", "4d", "4d-nchw", "5d-axis2", "3d-mask", "2d-renorm", "3d-ghost")
    for scale in ("ordinary", "mean1e4")
} | {"same-as-keras/4d", "same-as-keras/2d"}
# Checks that must report a line, passed or not (their JAX support is not a given here).
STATISTICS_CHECKS = {"recalibrate/exact", "recalibrate/fast", "inspect"}
BLOCKER = """
import runpy, sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
LINE = re.compile(r"^(PASS|FAIL) ([\w/.-]+): (.+)$")


def _run() -> tuple[int, dict[str, tuple[str, str]], str]:
    """Runs the script `--cpu --quick` without TensorFlow; exit status, checks, full output.

    The checks map each check's name to its verdict and detail.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    env.pop("KERAS_BACKEND", None)  # the script sets it
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(SCRIPT), "--cpu", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    checks = {}
    for line in result.stdout.splitlines():
        match = LINE.match(line)
        if match:
            checks[match[2]] = (match[1], match[3])
    return result.returncode, checks, result.stdout + result.stderr


def _assert_layer_checks_pass(checks: dict, output: str) -> None:
    assert LAYER_CHECKS <= set(checks), output
    failed = {name: checks[name] for name in LAYER_CHECKS if checks[name][0] != "PASS"}
    assert not failed, failed
    # Each statistics check reports one line: PASS with its errors or FAIL with its reason.
    assert STATISTICS_CHECKS <= set(checks), output
    for name in STATISTICS_CHECKS:
        assert checks[name][1] and "\n" not in checks[name][1]
    verdict, summary = checks["all"]
    failures = [name for name, (v, _) in checks.items() if v == "FAIL" and name != "all"]
    assert verdict == ("FAIL" if failures else "PASS")
    assert summary.startswith(f"{len(checks) - 1 - len(failures)} of {len(checks) - 1} ")


def test_layer_checks_pass_on_jax_without_tensorflow():
    code, checks, output = _run()
    assert "Traceback" not in output, output
    assert "import" not in checks, checks.get("import")  # tfbn imported without TensorFlow
    _assert_layer_checks_pass(checks, output)
    assert checks["no-tensorflow"] == ("PASS", "tensorflow was not imported")
    assert code == (1 if checks["all"][0] == "FAIL" else 0)
    # The timings: both implementations and their ratio, for each timed shape.
    times = re.findall(r"^TIME time/(\w+) .* tfbn / keras (\d+\.\d+)$", output, re.MULTILINE)
    assert [name for name, _ in times] == ["4d", "2d"]
    assert all(float(ratio) > 0 for _, ratio in times)
