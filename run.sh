#!/usr/bin/env bash
# One entry point for a fresh machine: installs what tfbn needs, then runs the main job or the tests.
#   bash run.sh train [tfbn train options]   train LeNet+BatchNorm on Fashion-MNIST and export it
#   bash run.sh test  [pytest options]       check the code with ruff, then run the test suite
#   bash run.sh docs  [mkdocs build options] build the documentation site into site/
#   bash run.sh setup                        only install
# Environment: PYTHON (interpreter for the virtual environment, default python3), TFBN_VENV (its
# folder, default .venv), TFBN_DATA_DIR (a folder holding the Fashion-MNIST files: no apt-get),
# TFBN_APT_LOCK_WAIT (seconds to wait for another package manager to finish, default 600),
# TFBN_TEST_WORKERS (test processes, default 2).
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${TFBN_VENV:-.venv}
DATA_DIR=/usr/share/datasets/fashion-mnist
APT_LOCK_WAIT=${TFBN_APT_LOCK_WAIT:-600}
# The locks apt-get and dpkg take (fcntl locks); TFBN_APT_LOCKS overrides the list.
read -r -a APT_LOCKS <<<"${TFBN_APT_LOCKS:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock}"
EXTRAS="workflow,notebook,test,legacy,docs,jax"
TEST_WORKERS=${TFBN_TEST_WORKERS:-2}

say() { echo "[run.sh] $*" >&2; }

apt_lock_holder() {
    # Prints "PID PATH" for the first of the given lock files that a process holds, else nothing.
    "$PYTHON" - "$@" <<'EOF'
import fcntl, os, struct, sys
for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        continue
    query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    os.close(fd)
    if kind != fcntl.F_UNLCK:
        print(pid, path)
        break
EOF
}

process_name() {
    local name
    name=$(cat "/proc/$1/comm" 2>/dev/null) || name="unknown"
    echo "$name"
}

wait_for_apt_lock() {
    # Waits (up to APT_LOCK_WAIT seconds) until no other apt-get or dpkg holds the package locks.
    local waited=0 holder pid path
    holder=$(apt_lock_holder "${APT_LOCKS[@]}")
    [ -z "$holder" ] && return 0
    read -r pid path <<<"$holder"
    say "waiting for $path, held by process $pid ($(process_name "$pid")), up to ${APT_LOCK_WAIT}s"
    while [ -n "$holder" ]; do
        if [ "$waited" -ge "$APT_LOCK_WAIT" ]; then
            read -r pid path <<<"$holder"
            say "$path is still held by process $pid ($(process_name "$pid")) after ${waited}s:" \
                "let that package manager finish (or stop it), then run this command again"
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
        if [ $((waited % 30)) -eq 0 ]; then
            say "still waiting for the package manager lock (${waited}s)"
        fi
        holder=$(apt_lock_holder "${APT_LOCKS[@]}")
    done
    say "the package manager lock is free after ${waited}s"
}

install_system_packages() {
    # Fashion-MNIST comes from Debian's package; nothing is downloaded at run time.
    if [ -z "${TFBN_DATA_DIR:-}" ] && [ ! -f "$DATA_DIR/train-images-idx3-ubyte.gz" ]; then
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        say "installing Debian package dataset-fashion-mnist"
        wait_for_apt_lock
        # apt's own wait covers a package manager that starts between the check and the call.
        local lock_timeout=(-o "DPkg::Lock::Timeout=$APT_LOCK_WAIT")
        $sudo apt-get "${lock_timeout[@]}" update
        DEBIAN_FRONTEND=noninteractive $sudo apt-get "${lock_timeout[@]}" install -y \
            dataset-fashion-mnist
    fi
}

install_python_packages() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.tfbn-installed"
    # Reinstall only when the package metadata changed since the last install.
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        say "installing tfbn[$EXTRAS] and its dependencies into $VENV (a few minutes the first time)"
        "$VENV/bin/python" -m pip install --upgrade pip
        "$VENV/bin/python" -m pip install -e ".[$EXTRAS]"
        touch "$stamp"
    fi
}

lint() {
    # The whole tree, as CI sees it: a finding fails the run before any test starts.
    if ! "$VENV/bin/ruff" check . || ! "$VENV/bin/ruff" format --check .; then
        say "ruff found problems (above): fix them, e.g. with '$VENV/bin/ruff format .' and" \
            "'$VENV/bin/ruff check --fix .'"
        return 1
    fi
}

run_tests() {
    local rc=0
    # -v names each test as it ends, so that no long test looks like a hang; -n runs the tests in
    # TFBN_TEST_WORKERS processes (pytest-xdist; `-n 0` among the options: one process).
    "$VENV/bin/python" -m pytest -v -n "$TEST_WORKERS" "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then
        say "pytest collected no tests: failing"
        return 1
    fi
    return "$rc"
}

site_dir() {
    # The folder `mkdocs build` writes to: site/, or the --site-dir (-d) among its options.
    local dir="site"
    while [ $# -gt 0 ]; do
        case "$1" in
            -d | --site-dir)
                if [ $# -gt 1 ]; then
                    dir=$2
                    shift
                fi
                ;;
            --site-dir=*) dir=${1#--site-dir=} ;;
        esac
        shift
    done
    echo "$dir"
}

build_docs() {
    # A broken link or a docstring mkdocstrings cannot read fails the build (--strict).
    "$VENV/bin/python" -m mkdocs build --strict "$@"
    local dir
    dir=$(cd "$(site_dir "$@")" && pwd)
    say "documentation built: open $dir/index.html (or serve it: $VENV/bin/mkdocs serve)"
}

main() {
    cd "$(dirname "${BASH_SOURCE[0]}")"
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case "$cmd" in
        setup)
            install_system_packages
            install_python_packages
            ;;
        docs)
            install_python_packages
            build_docs "$@"
            ;;
        train)
            install_system_packages
            install_python_packages
            exec "$VENV/bin/tfbn" train "$@"
            ;;
        test)
            install_system_packages
            install_python_packages
            lint
            run_tests "$@"
            ;;
        *)
            echo "usage: bash run.sh {train|test|docs|setup} [options]" >&2
            exit 2
            ;;
    esac
}

# Sourced (by the tests), it only defines the functions above.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
