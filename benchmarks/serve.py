"""`make bench-serve`: `vlmopt serve` under load on loopback, against batch-1 serving and a plain FastAPI endpoint.

The model: the base CLIP's vision tower (ViT-B/32, random weights) quantized int8-dynamic, built offline by
`vlmopt demo-model --size base`, `export`, `convert`, `quantize --mode int8-dynamic` and benched by `vlmopt bench`
(which also gives the offline throughput per batch). Contenders, each in its own process, one at a time:
  batched   `vlmopt serve DIR int8-dynamic --max-batch 8 --max-delay-ms 5` (Ray Serve's @serve.batch)
  batch-1   the same server with `--max-batch 1`
  plain     a FastAPI endpoint on uvicorn calling vlmopt's runner once per request (no batching: the seed's approach)
The load: a bounded generator (a request count and a time limit per level), one image per request, at concurrency 1,
8 and 32: throughput, latency p50/p90/p99 and, for vlmopt serve, the batch sizes formed (from its /metrics).
Then the tiny LLaVA demo behind `vlmopt serve` at concurrency 4, streamed chat completions: tokens/s and time to
first token p50/p99. A benchmark reports; it does not gate.

  python benchmarks/serve.py [--root build/bench-serve] [--requests 16,64,128] [--time-limit 90]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
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


def build(root: Path) -> tuple[Path, Path]:
    """The base CLIP with an int8-dynamic vision tower, benched; the tiny LLaVA demo converted (each skipped when done)."""
    clip, llava = root / "clip", root / "llava"
    if not (clip / "vlmopt.json").exists():
        sh("demo-model", root / "clip-src", "--size", "base")
        sh("export", root / "clip-src", "-o", clip)
    sh("convert", clip)
    sh("quantize", clip, "--mode", "int8-dynamic")
    sh("bench", clip, "int8-dynamic", "--tower", "vision", "--batch", "1,2,4,8", "--iterations", 10, "--warmup", 2)
    if not (llava / "vlmopt.json").exists():
        sh("demo-model", root / "llava-src", "--family", "llava", "--size", "tiny")
        sh("export", root / "llava-src", "-o", llava)
    sh("convert", llava)
    return clip, llava


def offline_throughput(clip: Path) -> dict[int, float]:
    """Images/s of int8-dynamic's vision tower per batch, from the newest bench report."""
    reports = sorted((clip / "reports").glob("bench-*.json"), key=lambda p: p.stat().st_mtime)
    rows = json.loads(reports[-1].read_text())["rows"]
    return {r["batch"]: r["throughput"] for r in rows if r["artifact"] == "int8-dynamic" and r["tower"] == "vision"}


# -- servers ------------------------------------------------------------------------------------------
class Process:
    """A server in its own process; `url` once it answers."""

    def __init__(self, args: list[str], ready: Any):
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.url = ready(self.process)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.process.kill()


def vlmopt_serve(model_dir: Path, *flags: object) -> Process:
    def ready(process: subprocess.Popen[str]) -> str:
        line = process.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"vlmopt serve {model_dir} {' '.join(map(str, flags))} did not start (exit {process.wait()})")
        return json.loads(line)["url"]

    return Process([*VLMOPT, "serve", str(model_dir), *map(str, flags), "--port", "0", "--json"], ready)


def plain_server(model_dir: Path) -> Process:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def ready(process: subprocess.Popen[str]) -> str:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")
                return url
            except OSError:
                if process.poll() is not None:
                    raise SystemExit("the plain FastAPI server did not start") from None
                time.sleep(0.5)
        raise SystemExit("the plain FastAPI server did not start in 300 s")

    return Process([sys.executable, __file__, "--plain-server", str(model_dir), "--port", str(port)], ready)


def run_plain_server(model_dir: Path, port: int) -> None:
    """The seed's approach: a FastAPI endpoint that decodes the image and calls the model once per request."""
    import io

    import uvicorn
    from fastapi import FastAPI
    from PIL import Image

    from vlmopt.calibration import saved_processors
    from vlmopt.runners import ArtifactRunners
    from vlmopt.workspace import ModelDir

    directory = ModelDir.open(model_dir)
    artifact = directory.artifact("int8-dynamic")
    runners = ArtifactRunners(directory.artifact_path(artifact.name), artifact)
    tower = runners.towers()["vision"]
    runner = runners.runner(tower)
    _, processor = saved_processors(directory.checkpoint_folder(artifact))
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


def load(url: str, concurrency: int, requests: int, time_limit: float, bodies: list[bytes]) -> dict[str, Any]:
    """`requests` single-image requests from `concurrency` clients, stopping early at `time_limit` seconds."""
    local = threading.local()
    for body in bodies[:2]:  # warm-up, outside the measurement
        post(url, "/v1/embeddings/image", body, local)
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
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "throughput": len(latencies) / wall,
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


def batch_sizes(url: str) -> tuple[float, float]:
    """(model calls, items) the vision batcher has made so far, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    calls = items = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("tower") == "vision" and sample.name == "vlmopt_batch_size_count":
                calls += sample.value
            if sample.labels.get("tower") == "vision" and sample.name == "vlmopt_batch_size_sum":
                items += sample.value
    return calls, items


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "build" / "bench-serve")
    parser.add_argument("--requests", default="16,64,128", help="requests per concurrency level 1, 8, 32")
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds per concurrency level at most")
    parser.add_argument("--chat-requests", type=int, default=8)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--plain-server", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        run_plain_server(args.plain_server, args.port)
        return
    counts = dict(zip(CONCURRENCY, (int(n) for n in args.requests.split(",")), strict=True))
    clip, llava = build(args.root)
    offline = offline_throughput(clip)
    bodies = [json.dumps({"images": ["data:image/jpeg;base64," + base64.b64encode(p.read_bytes()).decode()]}).encode() for p in sorted(IMAGES.glob("*.jpg"))]
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)

    results: dict[str, list[dict[str, Any]]] = {}
    formed: dict[str, dict[int, float]] = {}
    contenders = {
        "vlmopt serve --max-batch 8": lambda: vlmopt_serve(clip, "int8-dynamic", "--max-batch", 8, "--max-delay-ms", 5, "--max-queue", 512),
        "vlmopt serve --max-batch 1": lambda: vlmopt_serve(clip, "int8-dynamic", "--max-batch", 1, "--max-queue", 512),
        "plain FastAPI, per request": lambda: plain_server(clip),
    }
    for name, start in contenders.items():
        print(f"starting {name} ...", flush=True)
        server = start()
        try:
            results[name] = []
            for concurrency in CONCURRENCY:
                before = batch_sizes(server.url) if name.startswith("vlmopt") else (0.0, 0.0)
                row = load(server.url, concurrency, counts[concurrency], args.time_limit, bodies)
                if name.startswith("vlmopt"):
                    calls, items = (after - b for after, b in zip(batch_sizes(server.url), before, strict=True))
                    row["mean_batch"] = items / calls if calls else None
                    formed.setdefault(name, {})[concurrency] = row["mean_batch"]
                results[name].append(row)
                print(f"  {name} c={concurrency}: {json.dumps(row)}", flush=True)
        finally:
            server.stop()

    print("starting vlmopt serve on the tiny LLaVA ...", flush=True)
    server = vlmopt_serve(llava, "--max-tokens", args.chat_tokens)
    try:
        image = "data:image/jpeg;base64," + base64.b64encode((IMAGES / "astronaut.jpg").read_bytes()).decode()
        chat_load(server.url, 1, 1, 4, image)  # warm-up
        chat = chat_load(server.url, 4, args.chat_requests, args.chat_tokens, image)
    finally:
        server.stop()
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    print(f"\nbase CLIP ViT-B/32 vision, int8-dynamic, one image per request, loopback (load average after: {' '.join(load_after)})\n")
    print("| server | concurrency | requests | images/s | p50 ms | p90 ms | p99 ms | p99/p50 | mean batch formed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for row in rows:
            batch = f"{row['mean_batch']:.2f}" if row.get("mean_batch") else ""
            print(
                f"| {name} | {row['concurrency']} | {row['requests']} | {row['throughput']:.2f} | {row['p50']:.1f} | {row['p90']:.1f} | "
                f"{row['p99']:.1f} | {row['p99'] / row['p50']:.2f} | {batch} |"
            )
    batched, single = results["vlmopt serve --max-batch 8"][-1], results["vlmopt serve --max-batch 1"][-1]
    plain = results["plain FastAPI, per request"][-1]
    print(f"\nat concurrency 32: batched {batched['throughput'] / single['throughput']:.2f}x batch-1 serving (target >= 2x), ", end="")
    print(f"{batched['throughput'] / plain['throughput']:.2f}x the plain endpoint; p99/p50 {batched['p99'] / batched['p50']:.2f} (target <= 3)")
    mean_batch = batched.get("mean_batch") or 1.0
    nearest = min(offline, key=lambda b: abs(b - mean_batch))
    print(
        f"offline (vlmopt bench) at batch {nearest} (nearest to the {mean_batch:.2f} formed): {offline[nearest]:.2f} images/s; "
        f"served {batched['throughput']:.2f} = {batched['throughput'] / offline[nearest]:.0%} of it (target: within 15%)"
    )
    print(f"offline throughput per batch: {json.dumps({b: round(t, 2) for b, t in sorted(offline.items())})}")
    print(
        f"\ntiny LLaVA demo, vlmopt serve, {chat['requests']} streamed chat completions of up to {args.chat_tokens} tokens at concurrency 4: "
        f"{chat['tokens_per_s']:.1f} tokens/s ({chat['tokens']} tokens), time to first token p50 {chat['ttft_p50']:.0f} ms, p99 {chat['ttft_p99']:.0f} ms"
    )


if __name__ == "__main__":
    main()
