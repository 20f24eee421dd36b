"""`vlmopt serve` of the tiny LLaVA demo: OpenAI-style chat completions, checked with the `openai` client itself."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import assert_refused, vlmopt_json
from serving import Server, call, data_url, metric
from vlmopt.samples import sample_image

pytestmark = pytest.mark.slow

PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def llava(converted: Callable[[str], Path]) -> Path:
    return converted("llava")


@pytest.fixture(scope="module")
def server(llava: Path) -> Iterator[Server]:
    with Server(llava, "--max-tokens", 64) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server):  # noqa: ANN201 - openai.OpenAI
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "picture.png"
    sample_image(1).save(path)
    return path


def _messages(prompt: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(sample_image(1))}}, {"type": "text", "text": prompt}]}]


def _generated(llava: Path, image_path: Path, *args: object) -> dict:
    return vlmopt_json("generate", llava, "--image", image_path, "--prompt", PROMPT, *args)


def test_openai_client_gets_the_text_vlmopt_generate_makes(server: Server, client, llava: Path, image_path: Path) -> None:  # noqa: ANN001
    expected = _generated(llava, image_path, "--max-new-tokens", 12)

    completion = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=12, temperature=0)

    assert completion.choices[0].message.content == expected["text"]
    assert completion.usage.completion_tokens == len(expected["tokens"])
    assert completion.usage.prompt_tokens == expected["prompt_tokens"]
    assert completion.choices[0].finish_reason == ("length" if expected["finish_reason"] == "length" else "stop")


def test_streamed_chunks_add_up_to_the_whole_completion(server: Server, client) -> None:  # noqa: ANN001
    whole = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=12)

    stream = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=12, stream=True)
    chunks = list(stream)

    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_max_tokens_bounds_the_completion(server: Server, client) -> None:  # noqa: ANN001
    completion = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=3)

    assert completion.usage.completion_tokens <= 3


def test_stop_string_ends_the_text_before_it(server: Server, client) -> None:  # noqa: ANN001
    whole = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=16).choices[0].message.content
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert len(stop) == 2, whole

    completion = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=16, stop=[stop])

    assert completion.choices[0].message.content == whole[: whole.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_temperature_samples_as_vlmopt_generate_does_with_the_same_seed(server: Server, client, llava: Path, image_path: Path) -> None:  # noqa: ANN001
    expected = _generated(llava, image_path, "--max-new-tokens", 12, "--temperature", "1.5", "--seed", 3)

    completion = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=12, temperature=1.5, seed=3)

    assert completion.choices[0].message.content == expected["text"]


def test_generated_tokens_are_counted_in_the_metrics(server: Server, client) -> None:  # noqa: ANN001
    before = metric(server.url, "vlmopt_generated_tokens_total")

    completion = client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=5)

    assert metric(server.url, "vlmopt_generated_tokens_total") == before + completion.usage.completion_tokens
    assert metric(server.url, "vlmopt_time_to_first_token_seconds_count") >= 1


def test_max_tokens_over_the_limit_is_refused_with_a_json_error(server: Server, client) -> None:  # noqa: ANN001
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=server.ready["model"], messages=_messages(), max_tokens=65)

    assert refused.value.status_code == 400
    assert refused.value.body["code"] == "max_tokens"
    assert call(server.url, "/health")[0] == 200


def test_unknown_model_is_refused_with_404(server: Server, client) -> None:  # noqa: ANN001
    import openai

    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-17", messages=_messages(), max_tokens=4)

    assert refused.value.body["code"] == "unknown_model"


def test_sigterm_lets_the_generation_in_flight_finish_refuses_new_requests_and_exits_0(llava: Path) -> None:
    import urllib.request

    with Server(llava, "--max-tokens", 200) as running:
        body = {"model": running.ready["model"], "messages": _messages(), "max_tokens": 150, "stream": True}
        request = urllib.request.Request(running.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as stream:
            first = stream.readline()
            assert first.startswith(b"data: ")
            running.process.send_signal(15)  # type: ignore[union-attr]
            rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        finish = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")][-1]["choices"][0]["finish_reason"]
        assert finish in ("length", "stop")
        assert running.process.wait(timeout=180) == 0  # type: ignore[union-attr]
        with pytest.raises(OSError):
            urllib.request.urlopen(running.url + "/health", timeout=10)


def test_serve_refuses_a_backend_the_artifact_cannot_run(llava: Path) -> None:
    assert_refused(llava, "serve", "hf", "--backend", "onnxruntime-genai", fragments=("runs on transformers",))
