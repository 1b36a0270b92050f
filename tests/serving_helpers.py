"""Helpers for the export/serve/web/contract tests: a tiny trained model, an ONNX file run in
ONNX Runtime alone, and a real server process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

import stackvision

SRC = str(Path(stackvision.__file__).resolve().parents[1])


def train_tiny(data_dir, cache_dir: str, out: Path, backbones=("lite0",), **params) -> Path:
    """A small stack (lite0, 2 folds by default) trained on ``data_dir``, saved to ``out``."""
    from stackvision import Runtime, StackedClassifier
    from stackvision.data import load_labelled

    listing = load_labelled(str(data_dir))
    model = StackedClassifier(list(backbones), folds=2, runtime=Runtime(cache_dir), **params)
    model.fit(listing.paths, listing.labels)
    model.save(str(out), report=False)
    return out


# Runs with `python -I` (no PYTHONPATH, no user site): only onnxruntime and numpy are imported.
ORT_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort

model, inp, out = sys.argv[1:4]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
x = np.load(inp)
proba = sess.run(None, {"image": x})[0]
np.save(out, proba)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("stackvision", "torch", "timm"))
print(json.dumps({"classes": json.loads(meta["stackvision.classes"]),
                  "input": json.loads(meta["stackvision.input"]),
                  "inputs": [(i.name, i.type, i.shape) for i in sess.get_inputs()],
                  "loaded": loaded}))
"""


def run_onnx_alone(onnx_path, batch, tmp_path):
    inp, out = tmp_path / "x.npy", tmp_path / "p.npy"
    np.save(inp, batch)
    res = subprocess.run(
        [sys.executable, "-I", "-c", ORT_SCRIPT, str(onnx_path), str(inp), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return np.load(out), json.loads(res.stdout)


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
