"""Helpers for the export/serve/web tests: a tiny trained model and a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import stackvision

SRC = str(Path(stackvision.__file__).resolve().parents[1])


def train_tiny(data_dir, cache_dir: str, out: Path, backbones=("lite0",), **params) -> Path:
    """A small stack (lite0, 2 folds by default) trained on ``data_dir``, saved to ``out``."""
    from stackvision import StackedClassifier
    from stackvision.data import load_labelled

    listing = load_labelled(str(data_dir))
    model = StackedClassifier(list(backbones), folds=2, cache_dir=cache_dir, **params)
    model.fit(listing.paths, listing.labels)
    model.save(str(out), report=False)
    return out


def images_of(folder) -> list[str]:
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [env.get("PYTHONPATH")])])
    return env


class Server:
    """``stackvision serve MODEL`` in a subprocess on a free loopback port."""

    def __init__(self, model: Path, *args: str, log: Path, startup_timeout: float = 240, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "stackvision.cli", "serve", str(model)]
        cmd += ["--port", str(self.port), "--log-level", "warning", "--device", "cpu", *args]
        self._fh = open(log, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            cmd, stdout=self._fh, stderr=subprocess.STDOUT, env={**child_env(), **(env or {})}
        )
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start in {startup_timeout} s:\n{self.output()}")
            time.sleep(0.3)

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
