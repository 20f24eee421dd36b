"""`vlmopt serve DIR [ARTIFACT]`: the model directory's chosen artifacts behind HTTP, one application with two runners.

- `service`: what is served (bench's recommendation per tower, or the generative artifact), loaded once per process;
- `app`: the FastAPI application (endpoints, limits, bounded queue, Prometheus metrics);
- `batching`: its dynamic batchers, one per runner;
- `ray_app`: the Ray Serve deployment around it;
- here: where it runs. By default in this process, on uvicorn, with the in-process batcher (loopback only, no other
  process, nothing to set up); with `--ray auto|ADDRESS` as a Ray Serve deployment on a running Ray cluster, with
  `--replicas`, each replica batching with Ray Serve's `@serve.batch`.

Ray Serve was the default on one machine too until it measured 0.70x a plain endpoint on 2 cores (its proxy,
controller and replica share them with the load): a single machine needs none of it. A refusal the user can fix (a
port in use, nothing servable, no reachable Ray cluster) is a VlmoptError before anything starts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmopt.errors import VlmoptError
from vlmopt.serving.options import DRAIN_TIMEOUT_S, ServeOptions

__all__ = ["ServeOptions", "serve"]


def serve(
    directory: str | os.PathLike[str], options: ServeOptions, threads: int | None = None, on_ready: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Serve until SIGTERM (in-flight requests finish, new ones are refused, then return) or Ctrl-C.

    `on_ready` hears, once the server answers, where it listens and what it serves."""
    options.validate()
    directory = Path(directory)
    model_name = options.model_name or directory.resolve().name
    if options.ray is None:
        _serve_here(directory, options, threads, model_name, on_ready)
    else:
        _serve_on_ray(directory, options, threads, model_name, on_ready)


def _serve_here(directory: Path, options: ServeOptions, threads: int | None, model_name: str, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
    """The application on uvicorn in this process. On SIGTERM (or Ctrl-C) uvicorn stops accepting, lets the requests
    in flight finish (up to DRAIN_TIMEOUT_S) and returns; a second SIGINT forces it."""
    import asyncio

    import uvicorn

    from vlmopt.serving.app import ServeApp
    from vlmopt.serving.service import open_service

    sock = _listening_socket(options.host, options.port)  # refused here, before the model loads: a port in use
    try:
        service = open_service(directory, options.artifact, options.max_batch, options.backend, threads)
        if getattr(service, "generative", False):
            service.load()
        application = ServeApp(service, options, model_name)
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        application.app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
        backlog=max(2048, options.max_queue),
    )
    server = uvicorn.Server(config)
    port = sock.getsockname()[1]

    async def run() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started and on_ready is not None:
            where = {"url": f"http://{_url_host(options.host)}:{port}", "model": model_name, "pid": os.getpid(), "replicas": 1}
            on_ready({**where, "ray": None, **application.service.describe()})
        await serving

    # uvicorn re-raises the signal that stopped it once it has put back the handler it found: that one is a no-op,
    # so a drained server returns (exit 0) instead of dying by the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(run())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        application.close()
        sock.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise VlmoptError(f"--host {host} is not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise VlmoptError(f"port {port} on {host} is in use by another program; choose another with --port (0 picks a free one)") from None
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
            raise VlmoptError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        raise
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _free_port(host: str) -> int:
    with _listening_socket(host, 0) as sock:
        return int(sock.getsockname()[1])


def _connect_ray(address: str) -> None:
    """Connect to the cluster at `address` ("auto": the running one)."""
    import ray

    if address != "auto":
        target = address.removeprefix("ray://")
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise VlmoptError(f"--ray {address} is not a cluster address: give auto, HOST:PORT (the head's GCS, 6379) or ray://HOST:PORT")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise VlmoptError(f"no Ray cluster reachable at {address} ({exc.strerror or exc}); start one with `ray start --head` or give its address") from None
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, namespace="vlmopt")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise VlmoptError(f"no Ray cluster reachable at --ray {address}: {first}; start one with `ray start --head` or give its address") from None


def _serve_on_ray(directory: Path, options: ServeOptions, threads: int | None, model_name: str, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
    import threading

    from vlmopt.serving.service import open_service

    # refused here, before Ray starts: nothing servable, a bad artifact, a port in use
    probe = open_service(directory, options.artifact, options.max_batch, options.backend, threads)
    described = probe.describe()
    probe.close()
    port = options.port or _free_port(options.host)
    _listening_socket(options.host, port).close()
    _connect_ray(options.ray)
    from ray import serve

    from vlmopt.serving.ray_app import APP_NAME, deployment

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its progress lines are not the user's business
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": options.host, "port": port}, logging_config={"log_level": "WARNING"})
        serve.run(deployment(options, threads).bind(str(directory.resolve()), options, threads, model_name), name=APP_NAME, route_prefix="/")
        if on_ready is not None:
            where = {"url": f"http://{_url_host(options.host)}:{port}", "model": model_name, "pid": os.getpid(), "replicas": options.replicas}
            on_ready({**where, "ray": options.ray, **described})
        stop.wait()
    finally:
        # Ray Serve stops routing to the application, lets each replica finish its requests, then stops it; a second
        # SIGTERM meanwhile changes nothing (Ray's own handler, put back after, would exit 15)
        try:
            with contextlib.suppress(Exception):  # nothing to delete when the deployment never started
                serve.delete(APP_NAME)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
