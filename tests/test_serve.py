"""`vlmopt serve` on the tiny CLIP: real servers on loopback (the single-process default; one on a Ray cluster), real HTTP."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import assert_refused, manifest, vlmopt, vlmopt_json
from serving import Server, call, data_url, metric, png_bomb
from vlmopt.samples import sample_image

pytestmark = pytest.mark.slow

#: the server under test batches for up to 200 ms (so concurrent requests meet) and admits 8 items at a time
SERVER_FLAGS = ("--max-batch", 16, "--max-delay-ms", 200, "--max-queue", 8, "--max-items", 8, "--request-timeout", 3)


@pytest.fixture(scope="module")
def benched(tmp_path_factory: pytest.TempPathFactory, converted: Callable[[str], Path]) -> Path:
    """The tiny CLIP converted, quantized (int8-dynamic) and benched: it has a recommendation per tower."""
    model_dir = tmp_path_factory.mktemp("serve") / "clip"
    shutil.copytree(converted("clip"), model_dir)
    vlmopt_json("quantize", model_dir, "--mode", "int8-dynamic", "--min-cosine", "off")
    vlmopt_json("bench", model_dir, "--batch", "1,16", "--iterations", 2, "--warmup", 0)
    return model_dir


@pytest.fixture(scope="module")
def server(benched: Path) -> Iterator[Server]:
    with Server(benched, *SERVER_FLAGS) as running:
        yield running
        assert running.terminate() == 0


def _image(index: int = 1) -> str:
    return data_url(sample_image(index))


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _reference(model_dir: Path, artifact: str, tower: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    """What vlmopt's own runner gives for `feed`, normalized as the server normalizes dual-encoder embeddings."""
    from vlmopt.runners import ArtifactRunners
    from vlmopt.workspace import ModelDir

    directory = ModelDir.open(model_dir)
    record = directory.artifact(artifact)
    with ArtifactRunners(directory.artifact_path(artifact), record) as runners:
        spec = runners.towers()[tower]
        with runners.runner(spec) as runner:
            rows = runner.run(feed)[spec.outputs[0].name]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_serves_benchs_recommendation_per_tower_by_default(server: Server, benched: Path) -> None:
    choices = manifest(benched)["recommendation"]["choices"]
    expected = {c["tower"]: c["artifact"] for c in choices if c["batch"] == 16}

    status, ready, _ = call(server.url, "/ready")

    assert status == 200
    assert {tower: served["artifact"] for tower, served in ready["towers"].items()} == expected
    assert all("bench's recommendation at batch 16" in served["reason"] for served in ready["towers"].values())


def test_image_embeddings_equal_vlmopt_runner_on_the_same_image(server: Server, benched: Path) -> None:
    from transformers import AutoImageProcessor

    status, body, _ = call(server.url, "/v1/embeddings/image", {"images": [_image(1), _image(2)]})

    assert status == 200, body
    artifact = body["artifact"]
    processor = AutoImageProcessor.from_pretrained(str(benched / "hf"))
    pixels = processor(images=[sample_image(1).convert("RGB"), sample_image(2).convert("RGB")], return_tensors="np")["pixel_values"]
    expected = _reference(benched, artifact, "vision", {"pixel_values": pixels.astype(np.float32)})
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), expected, atol=1e-4)


def test_text_embeddings_equal_vlmopt_runner_on_the_same_text(server: Server, benched: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    texts = ["a photo of a cat", "two dogs playing in the snow on a sunny day"]
    status, body, _ = call(server.url, "/v1/embeddings/text", {"texts": texts, "model": server.ready["model"]})

    assert status == 200, body
    positions = AutoConfig.from_pretrained(str(benched / "hf")).text_config.max_position_embeddings
    tokens = AutoTokenizer.from_pretrained(str(benched / "hf"))(texts, padding=True, truncation=True, max_length=positions, return_tensors="np")
    feed = {"input_ids": tokens["input_ids"].astype(np.int64), "attention_mask": tokens["attention_mask"].astype(np.int64)}
    expected = _reference(benched, body["artifact"], "text", feed)
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), expected, atol=1e-4)


def test_zero_shot_scores_each_image_against_every_label(server: Server) -> None:
    labels = ["a cat", "a dog", "a red car"]

    status, body, _ = call(server.url, "/v1/zero-shot", {"images": [_image(1), _image(3)], "labels": labels})

    assert status == 200, body
    assert body["activation"] == "softmax"
    for row in body["data"]:
        assert len(row["scores"]) == len(labels)
        assert sum(row["scores"]) == pytest.approx(1.0, abs=1e-6)
        assert row["label"] == labels[int(np.argmax(row["similarities"]))]


def test_concurrent_requests_are_batched_by_the_server(server: Server) -> None:
    batches_before = metric(server.url, "vlmopt_batch_size_count", tower="vision")
    items_before = metric(server.url, "vlmopt_batch_size_sum", tower="vision")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: call(server.url, "/v1/embeddings/image", {"images": [_image(i)]}), range(8)))

    assert [status for status, _, _ in answers] == [200] * 8
    batches = metric(server.url, "vlmopt_batch_size_count", tower="vision") - batches_before
    items = metric(server.url, "vlmopt_batch_size_sum", tower="vision") - items_before
    assert items == 8
    assert batches < 8, f"8 concurrent images ran in {batches} model calls"


def test_each_image_times_its_preprocessing_and_each_batch_its_model_call(server: Server) -> None:
    def timed(stage: str) -> tuple[float, float]:
        return (
            metric(server.url, "vlmopt_batch_stage_seconds_count", tower="vision", stage=stage),
            metric(server.url, "vlmopt_batch_stage_seconds_sum", tower="vision", stage=stage),
        )

    batches_before = metric(server.url, "vlmopt_batch_size_count", tower="vision")
    before = {stage: timed(stage) for stage in ("preprocess", "model")}

    status, body, _ = call(server.url, "/v1/embeddings/image", {"images": [_image(1), _image(2), _image(3)]})

    assert status == 200, body
    batches = metric(server.url, "vlmopt_batch_size_count", tower="vision") - batches_before
    expected = {"preprocess": 3, "model": batches}
    for stage, (count, seconds) in before.items():
        count_after, seconds_after = timed(stage)
        assert count_after - count == expected[stage] and batches >= 1, stage
        assert seconds_after > seconds, stage


def test_the_servers_onnx_runtime_threads_do_not_spin_between_batches(benched: Path) -> None:
    from vlmopt.serving.service import open_service

    service = open_service(benched, "int8-dynamic")
    try:
        assert set(service.runners) == {"vision", "text"}
        for runner in service.runners.values():
            assert runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    finally:
        service.close()


def test_a_full_queue_answers_503_with_retry_after(server: Server) -> None:
    # each request holds 8 items (the whole queue) for the 200 ms its batch waits to fill
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: call(server.url, "/v1/embeddings/text", {"texts": [f"text {i} {j}" for j in range(8)]}), range(6)))

    statuses = sorted(status for status, _, _ in answers)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next((body, headers) for status, body, headers in answers if status == 503)
    assert refused[0]["error"]["code"] == "overloaded"
    assert int(refused[1]["retry-after"]) >= 1


def test_health_and_metrics_answer(server: Server) -> None:
    assert call(server.url, "/health")[:2] == (200, {"status": "ok"})
    status, text, headers = call(server.url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("vlmopt_requests_total", "vlmopt_request_latency_seconds", "vlmopt_batch_size", "vlmopt_queue_depth", "vlmopt_errors_total"):
        assert name in text


# -- bad input to the server: a 4xx JSON error, counted, and the server serves on -------------------------------
def _truncated_png() -> str:
    buffer = io.BytesIO()
    sample_image(4).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()[:400]).decode()


BAD_REQUESTS = {
    "not an image": ("/v1/embeddings/image", {"images": [base64.b64encode(b"just some text").decode()]}, 400, "bad_image"),
    "truncated image": ("/v1/embeddings/image", {"images": [_truncated_png()]}, 400, "bad_image"),
    "decompression bomb": ("/v1/embeddings/image", {"images": [base64.b64encode(png_bomb()).decode()]}, 413, "image_too_large"),
    "not base64": ("/v1/embeddings/image", {"images": ["%%%not base64%%%"]}, 400, "bad_image"),
    "empty text": ("/v1/embeddings/text", {"texts": ["  "]}, 400, "empty_text"),
    "too many items": ("/v1/embeddings/text", {"texts": ["a cat"] * 9}, 413, "too_many_items"),
    "malformed json": ("/v1/embeddings/text", b'{"texts": ["a cat"', 400, "bad_json"),
    "unknown model": ("/v1/embeddings/text", {"texts": ["a cat"], "model": "gpt-17"}, 404, "unknown_model"),
    "chat on an encoder": ("/v1/chat/completions", {"model": "clip", "messages": [{"role": "user", "content": "hi"}]}, 404, "not_found"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_json_error_counted_by_kind_and_the_server_serves_on(server: Server, case: str) -> None:
    path, body, expected_status, kind = BAD_REQUESTS[case]
    errors_before = metric(server.url, "vlmopt_errors_total", kind=kind)

    status, answer, headers = call(server.url, path, body)

    assert status == expected_status, answer
    assert headers["content-type"] == "application/json"
    assert answer["error"]["code"] == kind and answer["error"]["message"]
    assert metric(server.url, "vlmopt_errors_total", kind=kind) == errors_before + 1
    assert call(server.url, "/v1/embeddings/text", {"texts": ["still serving"]})[0] == 200


def test_a_slow_client_gets_408_and_others_are_served_meanwhile(server: Server) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as slow:
        slow.sendall(f"POST /v1/embeddings/text HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
        slow.sendall(b'{"texts": ["a')
        started = time.monotonic()
        assert call(server.url, "/v1/embeddings/text", {"texts": ["not slow"]})[0] == 200
        answer = b""
        while b"}}" not in answer and (chunk := slow.recv(4096)):
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"timeout"' in answer
    assert time.monotonic() - started < 30


# -- bad input to `vlmopt serve`: one line, exit 2, before anything starts ------------------------------------
def test_serve_refuses_a_port_in_use(benched: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_refused(benched, "serve", "onnx", "--port", port, fragments=(f"port {port}", "in use"))


def test_serve_refuses_a_model_directory_without_a_bench_recommendation(converted: Callable[[str], Path]) -> None:
    assert_refused(converted("clip"), "serve", fragments=("no bench recommendation", "vlmopt bench"))


def test_serve_refuses_an_unknown_artifact(benched: Path) -> None:
    assert_refused(benched, "serve", "int3", fragments=("no artifact named 'int3'",))


def test_serve_refuses_an_unreachable_ray_cluster(benched: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert_refused(benched, "serve", "onnx", "--ray", f"127.0.0.1:{port}", fragments=("no Ray cluster reachable",))


def test_serve_refuses_replicas_without_ray(benched: Path) -> None:
    result = vlmopt("serve", benched, "onnx", "--replicas", 2)
    assert result.exit_code == 2 and "--ray" in result.stderr


# -- on a Ray cluster ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A local Ray head owned by this test process (2 CPUs, loopback, no dashboard): its GCS address."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20, namespace="vlmopt-test")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def test_two_replicas_on_a_ray_cluster_both_answer(benched: Path, ray_head: str) -> None:
    with Server(benched, "onnx", "--ray", ray_head, "--replicas", 2) as running:
        replicas = set()
        for i in range(40):
            status, body, headers = call(running.url, "/v1/embeddings/text", {"texts": [f"request {i}"]})
            assert status == 200, body
            replicas.add(headers["x-vlmopt-replica"])
            if len(replicas) == 2:
                break
        assert running.ready["replicas"] == 2
        assert len(replicas) == 2, replicas
        assert running.terminate() == 0


# -- the default server's batcher, in process on the real service -----------------------------------------------
def _batched_in_process(benched: Path, items: int, gap_s: float, **limits: float) -> tuple[list[int], float]:
    """`items` images sent to the vision tower's QueueBatcher `gap_s` apart, the model held busy with the first batch
    until the last one is sent: the sizes of the model calls it made, and the seconds until every answer was in."""
    import asyncio
    import threading

    from vlmopt.serving.batching import QueueBatcher
    from vlmopt.serving.options import ServeOptions
    from vlmopt.serving.service import open_service

    service = open_service(benched, "int8-dynamic")
    sizes: list[int] = []
    images = [service.image(_png(sample_image(i % 4 + 1)), 10**8) for i in range(items)]
    all_sent = threading.Event()

    def run(batch: list) -> list:
        all_sent.wait(60)
        return service.embed_images(batch)

    async def send() -> tuple[list[list[float]], float]:
        batcher = QueueBatcher("vision", run, ServeOptions(**limits), sizes.append)
        started = time.perf_counter()
        try:
            answers = []
            for image in images:
                answers.append(asyncio.ensure_future(batcher(image)))
                await asyncio.sleep(gap_s)
            all_sent.set()
            return await asyncio.gather(*answers), time.perf_counter() - started
        finally:
            batcher.close()

    try:
        rows, elapsed = asyncio.run(send())
    finally:
        service.close()
    assert len(rows) == items and all(len(row) == len(rows[0]) for row in rows)
    return sizes, elapsed


def test_the_default_batcher_fills_the_next_batch_while_the_model_runs(benched: Path) -> None:
    # 9 images 20 ms apart, no delay allowed: the first runs alone, the 8 that arrive while it runs form one batch
    sizes, _ = _batched_in_process(benched, 9, 0.02, max_batch=8, max_delay_ms=0.0)

    assert sizes == [1, 8]


def test_the_default_batcher_waits_at_most_max_delay_for_a_batch_to_fill(benched: Path) -> None:
    sizes, elapsed = _batched_in_process(benched, 1, 0.0, max_batch=8, max_delay_ms=300.0)

    assert sizes == [1]
    assert 0.3 <= elapsed < 30
