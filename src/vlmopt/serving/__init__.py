"""`vlmopt serve DIR [ARTIFACT]`: the model directory's chosen artifacts behind HTTP, as a Ray Serve application.

- `service`: what is served (bench's recommendation per tower, or the generative artifact), loaded once per replica;
- `app`: the FastAPI application (endpoints, limits, bounded queue, `@serve.batch`, Prometheus metrics);
- `ray_app`: the Ray Serve deployment around it;
- here: where it runs. By default on this machine, in a private local Ray instance that vlmopt starts and stops
  (loopback only, nothing to set up); with `--ray auto|ADDRESS` on a running Ray cluster, with `--replicas`.

Ray Serve is the one serving library because its batcher, `@serve.batch`, runs only inside a Serve replica: the
same application then runs on one machine and on a cluster. A refusal the user can fix (a port in use, nothing
servable, no reachable Ray cluster) is a VlmoptError before anything starts.
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
from vlmopt.serving.options import ServeOptions

__all__ = ["ServeOptions", "serve"]

#: the local Ray instance's object store: the server passes no large objects through it
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20


def serve(
    directory: str | os.PathLike[str], options: ServeOptions, threads: int | None = None, on_ready: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Serve until SIGTERM (in-flight requests finish, new ones are refused, then return) or Ctrl-C.

    `on_ready` hears, once the server answers, where it listens and what it serves."""
    options.validate()
    directory = Path(directory)
    model_name = options.model_name or directory.resolve().name
    _serve_on_ray(directory, options, threads, model_name, on_ready)


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


def _connect_ray(address: str | None) -> bool:
    """Connect to the cluster at `address` ("auto": the running one), or start a private local instance (None).
    Returns whether vlmopt started it (and so stops it)."""
    import ray

    if address is None:
        ray.init(  # "local": a new instance even where a cluster runs here (`ray start`, RAY_ADDRESS)
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
            logging_level="ERROR",
            log_to_driver=False,
            namespace="vlmopt",
        )
        return True
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
    return False


def _serve_on_ray(directory: Path, options: ServeOptions, threads: int | None, model_name: str, on_ready: Callable[[dict[str, Any]], None] | None) -> None:
    import threading

    from vlmopt.serving.service import open_service

    # refused here, before Ray starts: nothing servable, a bad artifact, a port in use
    probe = open_service(directory, options.artifact, options.max_batch, options.backend, threads)
    described = probe.describe()
    probe.close()
    port = options.port or _free_port(options.host)
    _listening_socket(options.host, port).close()
    started = _connect_ray(options.ray)
    import ray
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
            on_ready({**where, "ray": options.ray or "local", **described})
        stop.wait()
    finally:
        # Ray Serve stops routing to the application, lets each replica finish its requests, then stops it; a second
        # SIGTERM meanwhile changes nothing (Ray's own handler, put back after, would exit 15)
        try:
            with contextlib.suppress(Exception):  # nothing to delete when the deployment never started
                serve.delete(APP_NAME)
            if started:
                serve.shutdown()
                ray.shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
