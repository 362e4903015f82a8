"""Worker processes on 127.0.0.1 for the multi-worker tests: free ports, TF_CONFIG, bounded runs."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(arguments: list[list[str]], log_dir: pathlib.Path, timeout_s: float) -> None:
    """Runs one MultiWorkerMirroredStrategy worker per argument list (`python *args`), all in one
    cluster on 127.0.0.1, and fails the test unless every worker exits 0 within `timeout_s`.
    Workers still running at the end are killed, whatever happened."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(len(arguments))]}
    processes, logs = [], []
    try:
        for index, args in enumerate(arguments):
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "CUDA_VISIBLE_DEVICES": "",
            }
            log = open(log_dir / f"worker{index}.log", "w+")  # noqa: SIM115
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    [sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
        deadline = time.monotonic() + timeout_s
        for process, log in zip(processes, logs, strict=True):
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a worker ran longer than {timeout_s} s")
            log.seek(0)
            assert code == 0, log.read()[-4000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        for log in logs:
            log.close()
