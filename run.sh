#!/usr/bin/env bash
# One entry point for a fresh machine: installs what tfbn needs, then runs the main job or the tests.
#   bash run.sh train [tfbn train options]   train LeNet+BatchNorm on Fashion-MNIST and export it
#   bash run.sh test  [pytest options]       run the test suite
#   bash run.sh setup                        only install
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${TFBN_VENV:-.venv}
DATA_DIR=/usr/share/datasets/fashion-mnist

install_system_packages() {
    # Fashion-MNIST comes from Debian's package; nothing is downloaded at run time.
    if [ -z "${TFBN_DATA_DIR:-}" ] && [ ! -f "$DATA_DIR/train-images-idx3-ubyte.gz" ]; then
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        echo "[run.sh] installing Debian package dataset-fashion-mnist" >&2
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
    fi
}

install_python_packages() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[run.sh] creating virtual environment $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.tfbn-installed"
    # Reinstall only when the package metadata changed since the last install.
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "[run.sh] installing tfbn and its dependencies into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[test,legacy]"
        touch "$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        install_system_packages
        install_python_packages
        ;;
    train)
        install_system_packages
        install_python_packages
        exec "$VENV/bin/tfbn" train "$@"
        ;;
    test)
        install_system_packages
        install_python_packages
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "[run.sh] pytest collected no tests: failing" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: bash run.sh {train|test|setup} [options]" >&2
        exit 2
        ;;
esac
