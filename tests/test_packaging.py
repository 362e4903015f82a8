"""The light core: the wheel without extras needs TensorFlow, Keras and NumPy, and gives the layer,
the ops, recalibration and folding; the workflow's libraries come with `tfbn[workflow]`.

The wheel is built from the source tree and installed with pip, offline, into a new virtual
environment that holds nothing but the wheel's declared requirements and theirs: TensorFlow is far
too large to install afresh in the suite, so every file of those distributions (and only those,
as their RECORDs list them) is linked from this environment into the new one. pip then installs
the wheel with `--no-index`, so a requirement the wheel declares beyond them makes the install
fail; a library the code needs without declaring it makes the run there fail.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CORE_REQUIREMENTS = {"tensorflow", "keras", "numpy"}
WORKFLOW_MODULES = ("tensorflow_datasets", "keras_tuner", "matplotlib", "tqdm", "tensorboard")
CORE_MODULES = (
    "tfbn",
    "tfbn.layers.batch_norm",
    "tfbn.ops.nn",
    "tfbn.tools.recalibration",
    "tfbn.tools.export",
)
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    # No pip configuration of this machine (extra indexes, find-links): the wheel and what is
    # installed are all there is.
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source tree (the build leaves nothing in the tree)."""
    work = tmp_path_factory.mktemp("build")
    source = work / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "tfbn", source / "tfbn", ignore=shutil.ignore_patterns("__pycache__"))
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(work / "dist"), str(source)],
        env=_clean_env(),
    )  # fmt: skip
    (path,) = (work / "dist").glob("tfbn-*.whl")
    return path


def _metadata_requirements(wheel: Path) -> list[Requirement]:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(name).decode("utf-8")
    return [
        Requirement(line.split(":", 1)[1])
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def _applies(requirement: Requirement, extras) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras)


def _closure(requirements) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that satisfy `requirements`, and theirs, recursively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [(r, ("",)) for r in requirements if _applies(r, ("",))]
    while todo:
        requirement, _ = todo.pop()
        distribution = importlib.metadata.distribution(requirement.name)
        key = distribution.metadata["Name"].lower().replace("_", "-")
        assert distribution.version in requirement.specifier, (requirement, distribution.version)
        if key in found:
            continue
        found[key] = distribution
        extras = ("", *requirement.extras)
        todo += [
            (r, extras)
            for r in map(Requirement, distribution.requires or [])
            if _applies(r, extras)
        ]
    return found


def _link_distributions(distributions, site_packages: Path) -> int:
    """Links every file of `distributions` inside site-packages into `site_packages`."""
    count = 0
    for distribution in distributions:
        for file in distribution.files or []:
            if file.parts[0] == "..":  # scripts and data outside site-packages
                continue
            target = site_packages / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(Path(distribution.locate_file(file)).resolve())
                count += 1
    return count


@pytest.fixture(scope="module")
def core_env(wheel, tmp_path_factory):
    """A virtual environment with the wheel installed without extras: (python, site-packages)."""
    requirements = _metadata_requirements(wheel)
    core = [r for r in requirements if _applies(r, ("",))]
    assert {r.name.lower() for r in core} == CORE_REQUIREMENTS
    venv = tmp_path_factory.mktemp("core") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    site_packages = Path(purelib.stdout.strip())
    assert list(site_packages.iterdir()) == []  # empty: nothing from this environment
    assert _link_distributions(_closure(core).values(), site_packages) > 1000
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--no-cache-dir", str(wheel)],
        env=_clean_env(),
    )  # fmt: skip
    return python, site_packages


CORE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import numpy as np
    missing = {name: importlib.util.find_spec(name) is None for name in WORKFLOW_MODULES}
    for name in CORE_MODULES:
        __import__(name)
    import keras
    import tensorflow as tf
    import tfbn

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (64, 5)).astype("float32")
    x64 = x.astype("float64")
    layer = tfbn.BatchNorm(momentum=0.9, epsilon=1e-5)
    y = layer(x, training=True).numpy()
    reference = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, name="hidden"), tfbn.BatchNorm(name="bn"),
         keras.layers.Dense(3, name="logits")]
    )
    tfbn.recalibrate(model, tf.data.Dataset.from_tensor_slices(x).batch(16))
    features = model.get_layer("hidden")(x).numpy().astype("float64")
    folded = tfbn.fold_batch_norm(model)
    print(json.dumps({
        "tfbn_file": tfbn.__file__,
        "missing": missing,
        "layer_error": float(np.abs(y - reference).max()),
        "population_mean_error": float(np.abs(model.get_layer("bn").moving_mean.numpy()
                                              - features.mean(0)).max()),
        "folded_layers": [type(layer).__name__ for layer in folded.layers],
        "fold_error": float(np.abs(folded.predict(x, verbose=0)
                                   - model.predict(x, verbose=0)).max()),
        "workflow_imported": sorted({m.split(".")[0] for m in sys.modules} & set(WORKFLOW_MODULES)),
    }))
    """
)


def test_wheel_without_extras_gives_layer_ops_recalibration_and_folding(core_env, tmp_path):
    python, site_packages = core_env
    script = f"WORKFLOW_MODULES = {WORKFLOW_MODULES!r}\nCORE_MODULES = {CORE_MODULES!r}\n"
    result = _run([str(python), "-I", "-c", script + CORE_SCRIPT], env=_clean_env(), cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # The wheel's copy is imported, in an environment that has none of the workflow's libraries.
    assert Path(report["tfbn_file"]).is_relative_to(site_packages)
    assert report["missing"] == {name: True for name in WORKFLOW_MODULES}
    assert report["workflow_imported"] == []
    assert report["layer_error"] < 1e-5
    assert report["population_mean_error"] < 1e-4
    assert "BatchNorm" not in report["folded_layers"]
    assert report["fold_error"] < 1e-4


def test_workflow_libraries_come_with_the_workflow_extra(wheel):
    requirements = _metadata_requirements(wheel)
    workflow = {
        r.name.lower()
        for r in requirements
        if r.marker and r.marker.evaluate({"extra": "workflow"})
    }
    assert {"tensorflow-datasets", "keras-tuner", "tensorboard", "matplotlib", "tqdm"} <= workflow
    notebook = {
        r.name.lower()
        for r in requirements
        if r.marker and r.marker.evaluate({"extra": "notebook"})
    }
    assert {"jupyterlab", "jupytext", "nbclient", "ipykernel"} <= notebook


def test_importing_the_core_imports_no_workflow_library():
    # TensorFlow itself imports TensorBoard when it is installed: the baseline is what TensorFlow
    # and Keras import on their own.
    script = textwrap.dedent(
        f"""
        import sys
        import keras, numpy, tensorflow
        before = set(sys.modules)
        for name in {CORE_MODULES!r}:
            __import__(name)
        print(sorted({{m.split(".")[0] for m in set(sys.modules) - before}}))
        """
    )
    result = _run([sys.executable, "-c", script], env=_clean_env(), cwd=ROOT)
    imported = set(eval(result.stdout.strip().splitlines()[-1]))
    assert "tfbn" in imported
    assert not imported & set(WORKFLOW_MODULES), imported
