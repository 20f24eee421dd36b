"""`vlmopt serve`'s options, declared once: the CLI flags, their checks, and what the application reads."""

from __future__ import annotations

from dataclasses import dataclass

from vlmopt.errors import VlmoptError
from vlmopt.options import StageOptions, option

MIB = 2**20
#: seconds a stopping server (SIGTERM) or Ray replica (also a scale-down) waits for its requests to finish
DRAIN_TIMEOUT_S = 120


@dataclass
class ServeOptions(StageOptions):
    artifact: str = option(
        "",
        "The artifact to serve (default: bench's recommendation per tower for encoders; onnx, else hf, for generative models).",
        argument=True,
        metavar="[ARTIFACT]",
    )
    host: str = option("127.0.0.1", "Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).")
    port: int = option(8000, "Port to listen on; 0 picks a free one (the address is printed when ready).", minimum=0, maximum=65535)
    model_name: str | None = option(None, "The model name clients send (`model`); default: the model directory's folder name.", metavar="NAME")
    max_batch: int = option(8, "Largest batch the dynamic batcher forms (images or texts per model call); 1 turns batching off.", minimum=1, maximum=1024)
    max_delay_ms: float = option(5.0, "Longest a request waits for others to fill its batch, in milliseconds.", minimum=0.0, maximum=10_000.0)
    max_queue: int = option(256, "Most items (images, texts, generations) waiting or running; beyond it: 503 with Retry-After.", minimum=1)
    max_items: int = option(64, "Most images or texts in one request.", minimum=1)
    max_image_bytes: int = option(10 * MIB, "Largest encoded image, in bytes.", minimum=1)
    max_image_pixels: int = option(4096 * 4096, "Largest image, in pixels (width x height), checked before it is decoded.", minimum=1)
    max_text_chars: int = option(4096, "Longest text (or chat message), in characters.", minimum=1)
    max_tokens: int = option(512, "Largest max_tokens a chat completion may ask for.", minimum=1)
    request_timeout: float = option(30.0, "Seconds a client has to send its request body; a slower one gets 408.", minimum=0.0, exclusive=("min",))
    ray: str | None = option(
        None, "Deploy on a running Ray cluster: auto (the one `ray start` made here, or RAY_ADDRESS) or its address (HOST:6379, ray://HOST:10001)."
    )
    replicas: int = option(1, "Replicas of the application, each with the model loaded (more than one: with --ray).", minimum=1, maximum=1024)
    max_replicas: int | None = option(None, "Let Ray Serve's autoscaler add replicas up to this many under load (with --ray).", minimum=1, maximum=1024)
    backend: str = option(
        "auto",
        "Generative artifacts: transformers (hf), onnxruntime or onnxruntime-genai; auto: the artifact's first.",
        choices=("auto", "transformers", "onnxruntime", "onnxruntime-genai"),
    )

    def check(self) -> None:
        if (self.replicas > 1 or self.max_replicas) and self.ray is None:
            raise VlmoptError("--replicas and --max-replicas are for a Ray cluster; add --ray auto (or the cluster's address)")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise VlmoptError(f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}")

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    @property
    def max_body_bytes(self) -> int:
        """A request body's bound: every item at its largest, base64-encoded, plus room for the JSON around them."""
        return self.max_items * (self.max_image_bytes * 4 // 3 + self.max_text_chars * 4 + 1024) + MIB
