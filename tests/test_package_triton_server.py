"""`vlmopt package --backend python` served by a real Triton Inference Server.

The server is the `tritonserver` 2.51 that `nvidia-pytriton` 0.7 bundles (python backend only, CPU), installed by
`make install` into `.venv/triton` with numpy 1.26 beside it: its python-backend stub is built against numpy 1
(under numpy 2 it misreads every tensor). The stub runs the interpreter it finds first on PATH, so the test gives
it a virtual environment of its own whose path puts that numpy before this one's packages, and `LD_LIBRARY_PATH`
holds the interpreter's lib folder (without it the stub fails with `_recursion_count`, DESIGN.md). Raw images and
strings go in over HTTP; the embeddings that come back are compared with vlmopt's runner's on the same inputs, and
batching is read from the server's own statistics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import vlmopt
from vlmopt.runners import ArtifactRunners
from vlmopt.workspace import ModelDir

TRITON_HOME = Path(sys.prefix) / "triton"
SERVER_DIST = TRITON_HOME / "pytriton" / "tritonserver"
IMAGES = sorted((Path(__file__).resolve().parent.parent / "src" / "vlmopt" / "data" / "images").glob("*.jpg"))
SENTENCES = ["a photo of a cat", "two dogs playing in the snow", "a red brick wall"]
#: the dynamic batcher waits this long to fill a batch: long enough that a burst of requests is batched on a loaded machine
QUEUE_DELAY_US = 50_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_environment(folder: Path) -> Path:
    """A virtual environment for the python-backend stub: numpy 1.26 from .venv/triton first, then this environment's packages."""
    venv.create(folder, with_pip=False, symlinks=True)
    site = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    here = sysconfig.get_paths()["purelib"]
    (site / "vlmopt-triton.pth").write_text(f"{TRITON_HOME}\nimport site; site.addsitedir({here!r})\n")
    return folder / "bin"


def backends(folder: Path) -> Path:
    """PyTriton's python backend with the stub built for this interpreter's version, as PyTriton lays it out."""
    python = folder / "backends" / "python"
    python.mkdir(parents=True)
    for item in (SERVER_DIST / "backends" / "python").iterdir():
        if item.is_file():
            os.symlink(item, python / item.name)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    os.symlink(SERVER_DIST / "python_backend_stubs" / version / "triton_python_backend_stub", python / "triton_python_backend_stub")
    return folder / "backends"


class TritonServer:
    """A tritonserver process on a repository, on free loopback ports; stopped on exit."""

    def __init__(self, repository: Path, workdir: Path):
        self.repository = repository
        if not (SERVER_DIST / "bin" / "tritonserver").is_file():
            pytest.fail(f"no tritonserver at {SERVER_DIST}: run `make install` (it installs nvidia-pytriton into {TRITON_HOME})")
        self.http_port = free_port()
        self.log = workdir / "tritonserver.log"
        env = dict(os.environ)
        env["PATH"] = f"{stub_environment(workdir / 'stub-env')}:{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = ":".join(
            p for p in (sysconfig.get_config_var("LIBDIR"), str(TRITON_HOME / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")) if p
        )
        command = [
            str(SERVER_DIST / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={backends(workdir / 'server')}",
            f"--http-port={self.http_port}",
            f"--grpc-port={free_port()}",
            f"--metrics-port={free_port()}",
            "--exit-timeout-secs=5",
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"localhost:{self.http_port}"

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tritonserver exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        pytest.fail(f"tritonserver not ready after {timeout:.0f} s:\n{self.tail()}")

    def stats(self, model: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.url}/v2/models/{model}/stats", timeout=10) as response:
            return json.loads(response.read())["model_stats"][0]

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Path:
    folder = tmp_path_factory.mktemp("served") / "clip"
    shutil.copytree(converted("clip"), folder)
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    workdir = tmp_path_factory.mktemp("triton")
    repository = workdir / "repository"
    result = vlmopt("package", model_dir, "--triton", repository, "onnx", "--backend", "python", "--max-queue-delay-us", QUEUE_DELAY_US, "--threads", "1")
    assert result.exit_code == 0, result.output
    server = TritonServer(repository, workdir)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Any:
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server.url, concurrency=16, network_timeout=120)


def raw_input(name: str, items: list[bytes]) -> Any:
    import tritonclient.http as httpclient

    data = np.array([[item] for item in items], dtype=object)
    tensor = httpclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def runner_embeddings(model_dir: Path, tower: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    """vlmopt's runner on the `onnx` artifact, L2-normalized as the repository's ensemble normalizes."""
    home = ModelDir.open(model_dir)
    artifact = home.artifact("onnx")
    with ArtifactRunners(home.artifact_path("onnx"), artifact, threads=1) as runners, runners.runner(artifact.towers[tower].tower) as runner:
        (embeds,) = runner.run(feed).values()
    return embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)


def test_served_image_embeddings_equal_vlmopt_runners_on_the_same_images(server: TritonServer, client: Any, model_dir: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    photos = IMAGES[:3]
    served = client.infer("clip_vision", [raw_input("image", [p.read_bytes() for p in photos])]).as_numpy("image_embeds")

    processor = AutoImageProcessor.from_pretrained(str(model_dir / "hf"), local_files_only=True)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in photos], return_tensors="np")["pixel_values"].astype(np.float32)
    expected = runner_embeddings(model_dir, "vision", {"pixel_values": pixels})
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=-1), 1.0, atol=1e-5)


def test_served_text_embeddings_equal_vlmopt_runners_on_the_same_strings(server: TritonServer, client: Any, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    served = client.infer("clip_text", [raw_input("text", [s.encode() for s in SENTENCES])]).as_numpy("text_embeds")

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir / "hf"), local_files_only=True)
    encoded = tokenizer(SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="np")
    feed = {name: np.asarray(encoded[name], dtype=np.int64) for name in ("input_ids", "attention_mask")}
    expected = runner_embeddings(model_dir, "text", feed)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


def test_concurrent_requests_are_batched_by_the_server(server: TritonServer, client: Any) -> None:
    before = server.stats("clip_vision_python")
    photos = [IMAGES[i % len(IMAGES)].read_bytes() for i in range(24)]

    pending = [client.async_infer("clip_vision", [raw_input("image", [photo])]) for photo in photos]
    results = [p.get_result().as_numpy("image_embeds") for p in pending]

    after = server.stats("clip_vision_python")
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert len(results) == 24 and inferences == 24
    assert executions < inferences, f"24 concurrent requests ran in {executions} executions: none was batched"
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) > 1


def test_an_unreadable_image_fails_its_own_request_and_the_server_keeps_serving(server: TritonServer, client: Any) -> None:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="cannot read the image"):
        client.infer("clip_vision", [raw_input("image", [b"not an image"])])

    served = client.infer("clip_vision", [raw_input("image", [IMAGES[0].read_bytes()])]).as_numpy("image_embeds")
    assert served.shape == (1, 16)


def test_the_readmes_curl_request_is_answered_with_the_text_embedding(server: TritonServer, client: Any) -> None:
    readme = (server.repository / "README.md").read_text()
    path = re.search(r"curl -s localhost:8000(/v2/models/\S+/infer)", readme).group(1)
    body = re.search(r"-d '(\{.*\})'", readme).group(1)

    request = urllib.request.Request(f"http://{server.url}{path}", data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        (output,) = json.loads(response.read())["outputs"]

    expected = client.infer("clip_text", [raw_input("text", [b"a photo of a cat"])]).as_numpy("text_embeds")
    np.testing.assert_allclose(np.array(output["data"], dtype=np.float32).reshape(output["shape"]), expected, atol=1e-6)
