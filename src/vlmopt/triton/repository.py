"""The README and Dockerfile `vlmopt package` writes at the top of a Triton model repository.

Triton reads only the model folders of a repository; files beside them are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmopt.triton.config import TRITON_IMAGE, TRITON_RELEASE, TRITON_SERVER_VERSION
from vlmopt.versions import package_version

#: what the python-backend steps import inside the container, pinned to the versions that made the repository
_PREPROCESS_PACKAGES = ("transformers", "tokenizers", "pillow")
#: the python-backend stub of this Triton release is built against numpy 1: under numpy 2 it misreads every tensor
_STUB_NUMPY = "numpy<2"


def _pins(names: tuple[str, ...]) -> list[str]:
    return [f"{name}=={package_version(name)}" if package_version(name) else name for name in names] + [_STUB_NUMPY]


def dockerfile(backend: str) -> str:
    """A Dockerfile for the Triton release the configurations were written for, with what the python steps import."""
    lines = [
        f"# Written by vlmopt package: Triton Inference Server {TRITON_SERVER_VERSION} (container release {TRITON_RELEASE}).",
        "# Build from this folder: docker build -t my-triton-models .",
        f"FROM {TRITON_IMAGE}",
        "",
        "# the python-backend pre-processing steps run the model's saved image processor and tokenizer",
        "RUN pip install --no-cache-dir " + " ".join(f'"{pin}"' for pin in _pins(_PREPROCESS_PACKAGES)),
    ]
    if backend == "python":
        lines += [
            "# --backend python: the towers run through vlmopt's own runner (pass a wheel or a git URL to pip)",
            f"ARG VLMOPT_PACKAGE=vlmopt=={package_version('vlmopt') or '0.1.0'}",
            f'RUN pip install --no-cache-dir "onnxruntime=={package_version("onnxruntime")}" "${{VLMOPT_PACKAGE}}" "{_STUB_NUMPY}"',
        ]
    lines += [
        "",
        "COPY . /models",
        "EXPOSE 8000 8001 8002",
        'CMD ["tritonserver", "--model-repository=/models"]',
        "",
    ]
    return "\n".join(lines)


def readme(out: Path, models: list[Any], entries: list[dict[str, Any]], towers: dict[str, Any], options: Any) -> str:
    """What the repository holds, how to serve it, and what each model expects."""
    example = entries[0]
    image_entry = next((e for e in entries if e["kind"] == "image"), None)
    text_entry = next((e for e in entries if e["kind"] == "text"), None)
    lines = [
        "# Triton model repository (written by `vlmopt package`)",
        "",
        f"Configurations written for Triton Inference Server {TRITON_SERVER_VERSION}, container release {TRITON_RELEASE} "
        f"(`{TRITON_IMAGE}`); every `config.pbtxt` was checked against Triton's model-configuration schema.",
        "",
        "## Serve it",
        "",
        "```sh",
        f"docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models {TRITON_IMAGE} \\",
        "  sh -c 'pip install --no-cache-dir " + " ".join(f'"{pin}"' for pin in _pins(_PREPROCESS_PACKAGES)) + " && tritonserver --model-repository=/models'",
        "```",
        "",
        "or build the image the `Dockerfile` here describes (`docker build -t my-triton-models . && docker run --rm -p 8000:8000 my-triton-models`).",
        "Add `--gpus all` to `docker run` for TensorRT engines. vlmopt did not build or run this container (no container engine where it ran).",
        "",
        "## Models",
        "",
        "| model | what it is | takes | gives |",
        "|---|---|---|---|",
    ]
    for entry in entries:
        served = towers[entry["tower"]]
        outputs = ", ".join(f"`{o['name']}` FP32 {o['dims']}" for o in entry["outputs"])
        raw = "encoded image bytes (JPEG, PNG, ...)" if entry["kind"] == "image" else "UTF-8 text"
        norm = " (L2-normalized)" if entry["normalized"] else ""
        lines.append(
            f"| `{entry['ensemble']}` | ensemble: pre-processing, the {entry['tower']} tower{', normalization' if entry['normalized'] else ''} | `{entry['input']}` BYTES [1]: {raw} | {outputs}{norm} |"
        )
        graph_inputs = ", ".join(f"`{t['name']}` {t['data_type'][5:]} {t['dims']}" for t in entry["graph_inputs"])
        lines.append(
            f"| `{entry['graph']}` | the {entry['tower']} tower: artifact `{served.artifact.name}` ({served.artifact.kind}) on {served.serving}, "
            f"max_batch_size {served.max_batch}, preferred {list(served.preferred) or 'none'} | {graph_inputs} | the tower's raw outputs |"
        )
        lines.append(
            f"| `{entry['preprocess']}` | python: the model's saved {'image processor' if entry['kind'] == 'image' else 'tokenizer'} | `{entry['input']}` | the tower's inputs |"
        )
    if any(e["normalized"] for e in entries):
        lines.append(f"| `{entries[0]['ensemble'].rsplit('_', 1)[0]}_normalize` | python: L2 normalization | `embeds` | `embedding` |")
    lines += ["", "Every model batches: shapes above leave out the batch axis; send `[N, 1]` items to an ensemble.", ""]
    lines += ["## Why these artifacts", ""]
    for tower, served in towers.items():
        lines.append(f"- {tower}: `{served.artifact.name}`: {served.reason}. Batching: {served.batching_reason}.")
    lines += ["", "## Ask it", ""]
    if text_entry is not None:
        lines += [
            "```sh",
            f"curl -s localhost:8000/v2/models/{text_entry['ensemble']}/infer -H 'Content-Type: application/json' \\",
            '  -d \'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["a photo of a cat"]}]}\'',
            "```",
            "",
        ]
    if image_entry is not None:
        lines += [
            "Images are binary, so send them with tritonclient (`pip install 'tritonclient[http]'`):",
            "",
            "```python",
            "import numpy as np",
            "import tritonclient.http as httpclient",
            "",
            'client = httpclient.InferenceServerClient("localhost:8000")',
            'image = np.array([[open("cat.jpg", "rb").read()]], dtype=object)',
            'data = httpclient.InferInput("image", list(image.shape), "BYTES")',
            "data.set_data_from_numpy(image)",
            f'result = client.infer("{image_entry["ensemble"]}", [data])',
            f'print(result.as_numpy("{image_entry["outputs"][0]["name"]}"))',
            "```",
            "",
        ]
    elif text_entry is None:
        lines += [f"Send `{example['input']}` to `{example['ensemble']}`.", ""]
    lines += [f"Server statistics (batch sizes formed, queue times): `curl -s localhost:8000/v2/models/{example['graph']}/stats`.", ""]
    return "\n".join(lines)
