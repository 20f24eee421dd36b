"""`make bench-serve`: `vlmopt serve` under load on loopback, against batch-1 serving, a plain FastAPI endpoint, the
peer LitServe, and the same application on Ray Serve (`--ray`, the default before its single-process runner).

The model: the base CLIP's vision tower (ViT-B/32, random weights) quantized int8-dynamic, built offline by
`vlmopt demo-model --size base`, `export`, `convert`, `quantize --mode int8-dynamic` and benched by `vlmopt bench`
(which also gives the offline throughput per batch, in this run). Contenders, each in its own process:
  batched   `vlmopt serve DIR int8-dynamic --max-batch 8 --max-delay-ms 5` (one process, its queue batcher)
  batch-1   the same server with `--max-batch 1`
  plain     a FastAPI endpoint on uvicorn calling vlmopt's runner once per request (no batching: the seed's approach)
  LitServe  LitServe 0.2.19 with the same runner and image processor, max_batch_size 8, batch_timeout 5 ms
  Ray Serve `vlmopt serve DIR int8-dynamic --ray ADDRESS` on a Ray head this benchmark starts (`@serve.batch`)
The load: a bounded generator (a request count and a time limit per level), one image per request, at concurrency 1,
8 and 32. The first four run at the same time, idle but one, and take turns: each level in the same order, and
concurrency 32 in `--rounds` rounds (A B C D, A B C D, ...: medians of images/s, latency percentiles over all rounds).
Ray Serve runs alone after them (its processes are not idle), at concurrency 32 only. Measured: throughput, latency
p50/p90/p99 and, for vlmopt serve, the batch sizes formed and each batch's preprocess and model time (from its
/metrics). Before the load, one image's steps are timed in process (decode, the image processor alone and over a
batch, the model at batch 1 and at --max-batch): where a request's time goes. Then the tiny LLaVA demo behind
`vlmopt serve` at concurrency 4, streamed chat completions: tokens/s and time to first token p50/p99. A benchmark
reports; it does not gate.

  python benchmarks/serve.py [--root build/bench-serve] [--requests 16,64,160] [--rounds 3] [--time-limit 60] [--no-ray] [--reuse-offline]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
from starlette.requests import Request  # noqa: E402  (the plain endpoint's annotation, resolved by FastAPI at import)

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "src" / "vlmopt" / "data" / "images"
CONCURRENCY = (1, 8, 32)
VLMOPT = [sys.executable, "-m", "vlmopt"]


def sh(*args: object) -> None:
    print("$ vlmopt " + " ".join(map(str, args)), flush=True)
    subprocess.run([*VLMOPT, *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def build(root: Path, measure_offline: bool = True) -> tuple[Path, Path]:
    """The base CLIP with an int8-dynamic vision tower, benched; the tiny LLaVA demo converted (each skipped when done)."""
    clip, llava = root / "clip", root / "llava"
    if not (clip / "vlmopt.json").exists():
        sh("demo-model", root / "clip-src", "--size", "base")
        sh("export", root / "clip-src", "-o", clip)
    sh("convert", clip)
    sh("quantize", clip, "--mode", "int8-dynamic")
    # --force: the offline ceiling is measured in this run, under this run's load, never read from an older report
    if measure_offline or not list((clip / "reports").glob("bench-*.json")):
        sh("bench", clip, "int8-dynamic", "--tower", "vision", "--batch", "1,2,4,8", "--iterations", 10, "--warmup", 2, "--force")
    if not (llava / "vlmopt.json").exists():
        sh("demo-model", root / "llava-src", "--family", "llava", "--size", "tiny")
        sh("export", root / "llava-src", "-o", llava)
    sh("convert", llava)
    return clip, llava


def offline_throughput(clip: Path) -> tuple[dict[int, float], str]:
    """Images/s of int8-dynamic's vision tower per batch, from the newest bench report, and when it was written."""
    reports = sorted((clip / "reports").glob("bench-*.json"), key=lambda p: p.stat().st_mtime)
    rows = json.loads(reports[-1].read_text())["rows"]
    at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(reports[-1].stat().st_mtime))
    return {r["batch"]: r["throughput"] for r in rows if r["artifact"] == "int8-dynamic" and r["tower"] == "vision"}, at


# -- servers ------------------------------------------------------------------------------------------
class Process:
    """A server in its own process; `url` once it answers."""

    def __init__(self, args: list[str], ready: Any):
        # a session of its own: what it starts (LitServe's workers) is stopped with it
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            self.url = ready(self.process)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # children left behind


def vlmopt_serve(model_dir: Path, *flags: object) -> Process:
    def ready(process: subprocess.Popen[str]) -> str:
        line = process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"vlmopt serve {model_dir} {' '.join(map(str, flags))} did not start (exit {process.wait()})")
        return json.loads(line)["url"]

    return Process([*VLMOPT, "serve", str(model_dir), *map(str, flags), "--port", "0", "--json"], ready)


def peer_server(kind: str, model_dir: Path) -> Process:
    """This file run as the `kind` server (plain, litserve) on a free port; ready once its /health answers 200."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def ready(process: subprocess.Popen[str]) -> str:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return f"http://127.0.0.1:{port}"
            except OSError:
                pass
            if process.poll() is not None:
                raise SystemExit(f"the {kind} server did not start (exit {process.returncode})")
            time.sleep(0.5)
        raise SystemExit(f"the {kind} server did not start in 300 s")

    return Process([sys.executable, __file__, "--peer", kind, str(model_dir), "--port", str(port)], ready)


def _vision(model_dir: Path) -> tuple[Any, Any, Any]:
    """(runner, tower, image processor) of int8-dynamic's vision tower, as vlmopt serve loads them."""
    from vlmopt.calibration import saved_processors
    from vlmopt.runners import ArtifactRunners
    from vlmopt.workspace import ModelDir

    directory = ModelDir.open(model_dir)
    artifact = directory.artifact("int8-dynamic")
    runners = ArtifactRunners(directory.artifact_path(artifact.name), artifact, spinning=False)  # as vlmopt serve's
    tower = runners.towers()["vision"]
    _, processor = saved_processors(directory.checkpoint_folder(artifact))
    return runners.runner(tower), tower, processor


if importlib.util.find_spec("litserve") is not None:
    import litserve

    class ClipVision(litserve.LitAPI):
        """LitServe's API for int8-dynamic's vision tower (module level: LitServe pickles it into its worker process)."""

        def __init__(self, model_dir: Path, **batching: Any):
            super().__init__(api_path="/v1/embeddings/image", **batching)
            self.model_dir = model_dir

        def setup(self, device: str) -> None:
            self.runner, self.tower, self.processor = _vision(self.model_dir)

        def decode_request(self, request):  # type: ignore[no-untyped-def]  # noqa: ANN001 - unannotated: LitServe hands over the JSON body
            import io

            from PIL import Image

            data = base64.b64decode(request["images"][0].partition(",")[2])
            return Image.open(io.BytesIO(data)).convert("RGB")

        def predict(self, images: list[Any]) -> Any:
            pixels = np.asarray(self.processor(images=list(images), return_tensors="np")["pixel_values"], dtype=np.float32)
            rows = self.runner.run({self.tower.inputs[0].name: pixels})[self.tower.outputs[0].name]
            return list(rows / np.linalg.norm(rows, axis=1, keepdims=True))

        def encode_response(self, row: Any) -> dict[str, Any]:
            return {"data": [{"index": 0, "embedding": row.tolist()}]}


def run_litserve(model_dir: Path, port: int, max_batch: int, max_delay_s: float) -> None:
    """LitServe's batching server: its API process reads the requests, its worker process batches them (its own
    loop: `max_batch_size` items, or what came within `batch_timeout`) and runs the same runner and processor."""
    api = ClipVision(model_dir, max_batch_size=max_batch, batch_timeout=max_delay_s)
    server = litserve.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=300)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, log_level="warning", generate_client_file=False)


def run_plain_server(model_dir: Path, port: int) -> None:
    """The seed's approach: a FastAPI endpoint that decodes the image and calls the model once per request."""
    import io

    import uvicorn
    from fastapi import FastAPI
    from PIL import Image

    runner, tower, processor = _vision(model_dir)
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings/image")
    async def embed(request: Request) -> dict[str, Any]:  # the one request type FastAPI hands over as is
        body = await request.json()
        data = base64.b64decode(body["images"][0].partition(",")[2])
        pixels = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")["pixel_values"]
        row = runner.run({tower.inputs[0].name: pixels.astype(np.float32)})[tower.outputs[0].name][0]
        return {"data": [{"index": 0, "embedding": (row / np.linalg.norm(row)).tolist()}]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- load ---------------------------------------------------------------------------------------------
def post(url: str, path: str, body: bytes, connections: threading.local) -> float:
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    for attempt in range(2):  # a kept-alive connection the server closed is reopened once
        connection = getattr(connections, "c", None) or http.client.HTTPConnection(host, int(port), timeout=300)
        connections.c = connection
        try:
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
            return time.perf_counter() - started
        except (http.client.HTTPException, ConnectionError):
            connection.close()
            connections.c = None
            if attempt:
                raise
    raise AssertionError("unreachable")


def warm_up(url: str, bodies: list[bytes]) -> None:
    local = threading.local()
    for body in bodies[:2] * 2:
        post(url, "/v1/embeddings/image", body, local)


def load(url: str, concurrency: int, requests: int, time_limit: float, bodies: list[bytes]) -> dict[str, Any]:
    """`requests` single-image requests from `concurrency` clients, stopping early at `time_limit` seconds."""
    deadline = time.monotonic() + time_limit
    latencies: list[float] = []
    issued = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        connections = threading.local()
        while time.monotonic() < deadline:
            with lock:
                index = next(issued, None)
            if index is None:
                return
            latency = post(url, "/v1/embeddings/image", bodies[index % len(bodies)], connections)
            with lock:
                latencies.append(latency)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    return {"concurrency": concurrency, "latencies": latencies, "throughput": len(latencies) / (time.perf_counter() - started)}


def merged(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one level as one row: the median images/s (and the rounds' range), percentiles over every request."""
    ms = np.asarray([latency for r in rounds for latency in r["latencies"]]) * 1000
    rates = [r["throughput"] for r in rounds]
    return {
        "concurrency": rounds[0]["concurrency"],
        "rounds": len(rounds),
        "requests": len(ms),
        "throughput": float(np.median(rates)),
        "range": (min(rates), max(rates)),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's /metrics samples: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def batching(before: dict[Any, float], after: dict[Any, float]) -> dict[str, Any]:
    """What the vision batcher did between two scrapes: model calls, mean batch, how many batches of each size
    (by histogram bucket) and the mean time of a batch's stages (the image processor over it, the model call)."""

    def value(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    calls, items = value("vlmopt_batch_size_count", tower="vision"), value("vlmopt_batch_size_sum", tower="vision")
    sizes, below = {}, 0.0
    for edge in ("1.0", "2.0", "3.0", "4.0", "6.0", "8.0", "12.0", "16.0", "24.0", "32.0"):
        upto = value("vlmopt_batch_size_bucket", tower="vision", le=edge)
        if upto - below:
            sizes[edge.removesuffix(".0")] = int(upto - below)
        below = upto
    stages = {
        stage: value("vlmopt_batch_stage_seconds_sum", tower="vision", stage=stage) / calls * 1000 if calls else float("nan")
        for stage in ("preprocess", "model")
    }
    answered = value("vlmopt_request_latency_seconds_count", endpoint="/v1/embeddings/image")
    inside = value("vlmopt_request_latency_seconds_sum", endpoint="/v1/embeddings/image") / answered * 1000 if answered else float("nan")
    return {
        "calls": calls,
        "mean_batch": items / calls if calls else None,
        "sizes": sizes,
        "preprocess_ms": stages["preprocess"],
        "model_ms": stages["model"],
        "replica_ms": inside,
    }


def breakdown(clip: Path, batch: int, images: list[Path], repeats: int = 3) -> dict[str, float]:
    """Where an image's time goes outside any server, in this process, each step timed in interleaved rounds (best
    of `repeats`): decoding, the saved image processor one image at a time and over a batch, and the model at batch 1
    and at `batch` (the runner the server uses: the same threads, not spinning). Milliseconds per image."""
    import io

    from PIL import Image

    from vlmopt.calibration import saved_processors
    from vlmopt.runners import ArtifactRunners
    from vlmopt.workspace import ModelDir

    directory = ModelDir.open(clip)
    artifact = directory.artifact("int8-dynamic")
    _, processor = saved_processors(directory.checkpoint_folder(artifact))
    blobs = [p.read_bytes() for p in images][:batch]
    blobs = (blobs * batch)[:batch]
    decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    pixels = np.asarray(processor(images=decoded, return_tensors="np")["pixel_values"], dtype=np.float32)
    with ArtifactRunners(directory.artifact_path(artifact.name), artifact, spinning=False) as runners:
        tower = runners.towers()["vision"]
        with runners.runner(tower) as runner:
            name = tower.inputs[0].name
            steps = {
                "decode": (lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs], batch),
                "processor, one image a call": (lambda: [processor(images=[i], return_tensors="np") for i in decoded], batch),
                f"processor, {batch} images a call": (lambda: processor(images=decoded, return_tensors="np"), batch),
                "model, batch 1": (lambda: runner.run({name: pixels[:1]}), 1),
                f"model, batch {batch}": (lambda: runner.run({name: pixels}), batch),
            }
            best = dict.fromkeys(steps, float("inf"))
            for call, _ in steps.values():
                call()  # warm-up
            for _ in range(repeats):
                for step, (call, count) in steps.items():
                    started = time.perf_counter()
                    call()
                    best[step] = min(best[step], (time.perf_counter() - started) * 1000 / count)
    return best


def chat_load(url: str, concurrency: int, requests: int, max_tokens: int, image: str) -> dict[str, Any]:
    """Streamed chat completions from `concurrency` clients: time to first token per request, tokens/s overall."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "llava",
            "stream": True,
            "max_tokens": max_tokens,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe this image."}]}],
        }
    ).encode()

    def one(_: int) -> tuple[float, int]:
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        started = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        first, tokens = None, 0
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        connection.close()
        return first if first is not None else float("nan"), tokens

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    ttft = np.asarray([r[0] for r in results]) * 1000
    return {
        "concurrency": concurrency,
        "requests": requests,
        "tokens": sum(r[1] for r in results),
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "ttft_p50": float(np.nanpercentile(ttft, 50)),
        "ttft_p99": float(np.nanpercentile(ttft, 99)),
    }


def target(met: bool) -> str:
    return "met" if met else "NOT met"


def ray_head() -> Any:
    """A Ray head owned by this process (loopback, no dashboard); its GCS address is `address_info["gcs_address"]`."""
    import ray

    return ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20, logging_level="ERROR")


def measure(servers: dict[str, Process], counts: dict[int, int], rounds: int, time_limit: float, bodies: list[bytes]) -> dict[str, list[dict[str, Any]]]:
    """Every server at every level, taking turns: concurrency 32 in `rounds` rounds; vlmopt serve's batching read from
    its /metrics around each level."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for server in servers.values():
        warm_up(server.url, bodies)
    for concurrency in CONCURRENCY:
        repeats = rounds if concurrency == max(CONCURRENCY) else 1
        before = {name: scrape(s.url) for name, s in servers.items() if name.startswith("vlmopt")}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for turn in range(repeats):
            for name, server in servers.items():
                runs[name].append(load(server.url, concurrency, counts[concurrency], time_limit, bodies))
                print(f"  {name} c={concurrency} round {turn + 1}: {runs[name][-1]['throughput']:.2f} images/s", flush=True)
        for name, server in servers.items():
            row = merged(runs[name])
            if name in before:
                row.update(batching(before[name], scrape(server.url)))
            results[name].append(row)
            print(f"  {name} c={concurrency}: {json.dumps({k: v for k, v in row.items() if k != 'range'}, default=str)}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "build" / "bench-serve")
    parser.add_argument("--requests", default="16,64,160", help="requests per concurrency level 1, 8, 32 (per round)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds at concurrency 32, the contenders taking turns")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per concurrency level and round at most")
    parser.add_argument("--max-batch", type=int, default=8, help="the batched servers' largest batch (bench measures offline up to 8)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="the batched servers' longest wait for a batch to fill")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray Serve contender (it starts a Ray head)")
    parser.add_argument(
        "--reuse-offline", action="store_true", help="read the offline ceiling from the newest bench report instead of measuring it again (the table says when)"
    )
    parser.add_argument("--chat-requests", type=int, default=8)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--peer", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        kind, model_dir = args.peer
        if kind == "plain":
            run_plain_server(Path(model_dir), args.port)
        else:
            run_litserve(Path(model_dir), args.port, args.max_batch, args.max_delay_ms / 1000)
        return
    counts = dict(zip(CONCURRENCY, (int(n) for n in args.requests.split(",")), strict=True))
    clip, llava = build(args.root, measure_offline=not args.reuse_offline)
    offline, offline_at = offline_throughput(clip)
    images = sorted(IMAGES.glob("*.jpg"))
    bodies = [json.dumps({"images": ["data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()]}).encode() for p in images]
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average before: {load_before}", flush=True)
    steps = breakdown(clip, args.max_batch, images)
    print(f"  per image, in process: {json.dumps({k: round(v, 2) for k, v in steps.items()})}", flush=True)

    batching_flags = ("--max-batch", args.max_batch, "--max-delay-ms", args.max_delay_ms, "--max-queue", 512)
    batched_name, single_name = f"vlmopt serve --max-batch {args.max_batch}", "vlmopt serve --max-batch 1"
    plain_name, lit_name = "plain FastAPI, per request", f"LitServe, max_batch_size {args.max_batch}"
    ray_name = f"vlmopt serve --ray (Ray Serve), --max-batch {args.max_batch}"
    contenders = {
        batched_name: lambda: vlmopt_serve(clip, "int8-dynamic", *batching_flags),
        single_name: lambda: vlmopt_serve(clip, "int8-dynamic", "--max-batch", 1, "--max-queue", 512),
        plain_name: lambda: peer_server("plain", clip),
        lit_name: lambda: peer_server("litserve", clip),
    }
    if importlib.util.find_spec("litserve") is None:
        print("LitServe is not installed (it comes with the serve extra: pip install -e '.[serve]'): left out of this run", flush=True)
        del contenders[lit_name]
    servers: dict[str, Process] = {}
    try:
        for name, start in contenders.items():
            print(f"starting {name} ...", flush=True)
            try:
                servers[name] = start()
            except SystemExit as exc:
                if name != lit_name:
                    raise
                print(f"{exc}: left out of this run", flush=True)
        results = measure(servers, counts, args.rounds, args.time_limit, bodies)
    finally:
        for server in servers.values():
            server.stop()

    if not args.no_ray:
        import ray

        print(f"starting a Ray head and {ray_name} ...", flush=True)
        try:
            head = ray_head()
        except Exception as exc:  # noqa: BLE001 - a Ray that cannot start here is reported, not fatal to the run
            print(f"the Ray head did not start ({(str(exc).splitlines() or [type(exc).__name__])[0][:200]}): {ray_name} left out of this run")
            ray.shutdown()
            head = None
    if not args.no_ray and head is not None:
        try:
            server = vlmopt_serve(clip, "int8-dynamic", *batching_flags, "--ray", head.address_info["gcs_address"])
        except SystemExit as exc:
            print(f"{exc}: {ray_name} left out of this run", flush=True)
        else:
            try:
                results.update(measure({ray_name: server}, {1: 4, 8: 8, 32: counts[32]}, 1, args.time_limit, bodies))
                results[ray_name] = results[ray_name][-1:]  # concurrency 32 only: the lower levels warm it
            finally:
                server.stop()
        ray.shutdown()

    print("starting vlmopt serve on the tiny LLaVA ...", flush=True)
    server = vlmopt_serve(llava, "--max-tokens", args.chat_tokens)
    try:
        image = "data:image/jpeg;base64," + base64.b64encode((IMAGES / "astronaut.jpg").read_bytes()).decode()
        chat_load(server.url, 1, 1, 4, image)  # warm-up
        chat = chat_load(server.url, 4, args.chat_requests, args.chat_tokens, image)
    finally:
        server.stop()
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    report(results, steps, offline, offline_at, chat, args, (load_before, load_after), (batched_name, single_name, plain_name, lit_name, ray_name))


def report(
    results: dict[str, list[dict[str, Any]]],
    steps: dict[str, float],
    offline: dict[int, float],
    offline_at: str,
    chat: dict[str, Any],
    args: argparse.Namespace,
    loads: tuple[str, str],
    names: tuple[str, str, str, str, str],
) -> None:
    batched_name, single_name, plain_name, lit_name, ray_name = names
    print(f"\n## vlmopt bench-serve: base CLIP ViT-B/32 vision, int8-dynamic, one JPEG per request, loopback, {os.cpu_count()} cores")
    print(f"load average: {loads[0]} before, {loads[1]} after\n")
    print(
        "| server | concurrency | rounds x requests | images/s (rounds' range) | p50 ms | p90 ms | p99 ms | p99/p50 | mean batch | batches by size "
        "| preprocess ms/batch | model ms/batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for row in rows:
            batch = f"{row['mean_batch']:.2f}" if row.get("mean_batch") else ""
            sizes = " ".join(f"{size}:{n}" for size, n in row.get("sizes", {}).items())
            stages = f"| {row['preprocess_ms']:.1f} | {row['model_ms']:.1f} |" if "model_ms" in row else "| | |"
            low, high = row["range"]
            spread = f" ({low:.2f}-{high:.2f})" if row["rounds"] > 1 else ""
            print(
                f"| {name} | {row['concurrency']} | {row['rounds']} x {row['requests'] // row['rounds']} | {row['throughput']:.2f}{spread} | "
                f"{row['p50']:.1f} | {row['p90']:.1f} | {row['p99']:.1f} | {row['p99'] / row['p50']:.2f} | {batch} | {sizes} {stages}"
            )
    print("\n| in process, ms per image | " + " | ".join(steps) + " |")
    print("|---|" + "---|" * len(steps))
    print("| best of 3 | " + " | ".join(f"{v:.2f}" for v in steps.values()) + " |")

    batched, single, plain = (results[n][-1] for n in (batched_name, single_name, plain_name))
    mean_batch = batched.get("mean_batch") or 1.0
    nearest = min(offline, key=lambda b: abs(b - mean_batch))
    pipeline = 1000 / (steps["decode"] + steps[f"processor, {args.max_batch} images a call"] + steps[f"model, batch {args.max_batch}"])
    ratio, offline_ratio = batched["throughput"] / single["throughput"], offline[max(offline)] / offline[1]
    served = batched["throughput"] / offline[nearest]
    # the model alone at the batch the server formed, from the server's own metrics in the same run: its ceiling then
    model_rate = batched["mean_batch"] * 1000 / batched["model_ms"] if batched.get("model_ms") else float("nan")
    per_image = {n: r["model_ms"] / r["mean_batch"] for n, r in ((batched_name, batched), (single_name, single)) if r.get("mean_batch")}
    if 0.85 <= served <= 1.15:
        verdict = "met"
    elif served > 1.15:
        verdict = "not judged: served beat offline, so the load changed between the two runs"
    else:
        verdict = "NOT met"
    in_process = steps["model, batch 1"] / steps[f"model, batch {args.max_batch}"]
    print("\n| at concurrency 32 (medians of the rounds) | value | target |")
    print("|---|---|---|")
    print(f"| batched / batch-1 serving | {ratio:.2f}x | >= 2x: {target(ratio >= 2)} |")
    print(f"| ceiling of that ratio: offline (vlmopt bench) batch {max(offline)} / batch 1 | {offline_ratio:.2f}x | (no server can beat it) |")
    print(f"| the same, in process (the server's runner, the table above): model batch {args.max_batch} / batch 1 | {in_process:.2f}x | |")
    print(
        f"| model ms per image inside the servers (their metrics): batched at mean batch {mean_batch:.2f} / batch-1 | "
        f"{per_image.get(batched_name, float('nan')):.1f} / {per_image.get(single_name, float('nan')):.1f} | |"
    )
    print(f"| batched / plain FastAPI per request | {batched['throughput'] / plain['throughput']:.2f}x | |")
    if lit_name in results:
        print(f"| batched / LitServe (the peer, batching too) | {batched['throughput'] / results[lit_name][-1]['throughput']:.2f}x | |")
    if ray_name in results:
        on_ray = results[ray_name][-1]
        print(
            f"| batched / the same on Ray Serve (`--ray`, one replica, alone after the others) | {batched['throughput'] / on_ray['throughput']:.2f}x "
            f"(mean batch {mean_batch:.2f} vs {on_ray.get('mean_batch') or float('nan'):.2f}) | |"
        )
    print(f"| batched p99 / p50 | {batched['p99'] / batched['p50']:.2f} | <= 3: {target(batched['p99'] <= 3 * batched['p50'])} |")
    print(
        f"| served / offline (vlmopt bench, model only, run before the load) at batch {nearest} (formed: {mean_batch:.2f}) | "
        f"{batched['throughput']:.2f} / {offline[nearest]:.2f} = {served:.0%} | within 15%: {verdict} |"
    )
    print(
        f"| served / the model alone at the formed batch, same run (the server's model time per batch) | "
        f"{batched['throughput']:.2f} / {model_rate:.2f} = {batched['throughput'] / model_rate:.0%} | within 15%: {target(batched['throughput'] >= 0.85 * model_rate)} |"
    )
    print(
        f"| served / offline pipeline at batch {args.max_batch} (decode + processor + model, in process) | "
        f"{batched['throughput']:.2f} / {pipeline:.2f} = {batched['throughput'] / pipeline:.0%} | |"
    )
    print(
        f"\noffline throughput per batch (vlmopt bench, images/s, report of {offline_at}): {json.dumps({b: round(t, 2) for b, t in sorted(offline.items())})}"
    )
    print(
        f"\ntiny LLaVA demo, vlmopt serve, {chat['requests']} streamed chat completions of up to {args.chat_tokens} tokens at concurrency 4: "
        f"{chat['tokens_per_s']:.1f} tokens/s ({chat['tokens']} tokens), time to first token p50 {chat['ttft_p50']:.0f} ms, p99 {chat['ttft_p99']:.0f} ms"
    )


if __name__ == "__main__":
    main()
