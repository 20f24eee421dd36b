# vlmopt serve in a container, on CPU. Build it from the repository root:
#   docker build -f examples/serve.Dockerfile -t vlmopt-serve .
# and run it on a model directory that vlmopt made and benched (read-only is enough):
#   docker run --rm -p 8000:8000 -v "$PWD/build/clip:/model:ro" vlmopt-serve
# Arguments after the image name replace the artifact and flags: ... vlmopt-serve int8-dynamic --max-batch 16
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/vlmopt
# torch first and pinned, as `make install` does: an unpinned torch pulls gigabytes of CUDA wheels
# (point pip at your platform's CPU wheels to keep the image small)
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve]"

# the server needs no root (one process; with --ray, a cluster elsewhere)
RUN useradd --create-home --uid 10001 vlmopt
USER vlmopt

EXPOSE 8000
# the server listens once the model is loaded, so /ready answers 200 from then on
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# SIGTERM (docker stop) lets the requests in flight finish, refuses new ones and exits 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["vlmopt", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
