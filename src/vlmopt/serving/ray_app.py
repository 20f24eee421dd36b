"""The Ray Serve deployment of `vlmopt serve`: each replica loads the service and answers with the same `ServeApp`.

Imported only where Ray runs (the `vlmopt serve` process and the replicas).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from vlmopt.serving.options import DRAIN_TIMEOUT_S, ServeOptions

APP_NAME = "vlmopt"


class VlmoptReplica:
    """One replica: the model loaded once, and the FastAPI app Ray Serve's proxy sends requests to."""

    def __init__(self, directory: str, options: ServeOptions, threads: int | None, model_name: str):
        from vlmopt.quiet import quiet_libraries
        from vlmopt.serving.app import ServeApp
        from vlmopt.serving.batching import RayBatcher
        from vlmopt.serving.service import open_service

        quiet_libraries(False)
        service = open_service(directory, options.artifact, options.max_batch, options.backend, threads)
        if getattr(service, "generative", False):
            service.load()
        self.application = ServeApp(service, options, model_name, RayBatcher)

    def __serve_build_asgi_app__(self) -> Any:
        return self.application.app

    def __del__(self) -> None:
        application = getattr(self, "application", None)
        if application is not None:
            application.close()


def deployment(options: ServeOptions, threads: int | None) -> Any:
    """The deployment: `--replicas` of them (autoscaling up to `--max-replicas`), each admitting up to `--max-queue`
    items, with Ray's own queue in front of them bounded too."""
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas and options.max_replicas > options.replicas:
        scaling = {"autoscaling_config": {"min_replicas": options.replicas, "max_replicas": options.max_replicas, "target_ongoing_requests": options.max_batch}}
    return serve.deployment(
        name=APP_NAME,
        max_ongoing_requests=options.max_queue + options.max_batch,
        max_queued_requests=options.max_queue,
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
        ray_actor_options={"num_cpus": 1},
        **scaling,
    )(serve.ingress()(VlmoptReplica))
