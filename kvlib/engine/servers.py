"""Local OpenAI-compatible servers: llama.cpp's (`llama-cpp-python[server]`) serving a GGUF on 127.0.0.1,
for kvlib's OpenAI-compatible backend without any API (tests, bench_eval, users without a GPU).

    with LlamaServer(embedded_gguf_path("smollm2-135m-instruct")) as server:
        backend = OpenAIChatBackend(server.model, base_url=server.base_url)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from kvlib.engine.io import file_sha256


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """`python -m llama_cpp.server` on a GGUF, on 127.0.0.1, started on enter and stopped on exit.

    The served model's name is `<file stem>@<first 12 hex of its sha256>`, so a response cache keyed on the
    name can never mix up two different GGUF files. The chat template is the one stored in the GGUF.
    """

    def __init__(self, gguf: str | Path, n_ctx: int = 8192, n_threads: int | None = None, port: int | None = None,
                 startup_timeout_s: float = 120.0, log_file: str | Path | None = None):
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise FileNotFoundError(f"{self.gguf}: GGUF file not found")
        self.n_ctx, self.n_threads = n_ctx, n_threads or os.cpu_count() or 1
        self.port = port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.log_file = Path(log_file) if log_file else None
        self.model = f"{self.gguf.stem}@{file_sha256(self.gguf)[:12]}"
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]

    def __enter__(self) -> "LlamaServer":
        try:
            import llama_cpp  # noqa: F401  (fail here, clearly, instead of in a subprocess log)
        except ImportError as exc:
            raise RuntimeError("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]' "
                               "(`make test` installs it)") from exc
        log = open(self.log_file, "w") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + self.startup_timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with code {self.process.returncode} during startup "
                                   f"(command: {' '.join(self.command())})")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        self.__exit__(None, None, None)
        raise TimeoutError(f"llama.cpp server not ready after {self.startup_timeout_s} s on {self.base_url}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
