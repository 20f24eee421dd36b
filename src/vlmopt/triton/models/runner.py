"""Triton python-backend model written by `vlmopt package --backend python`: one tower of a vlmopt artifact,
run through vlmopt's own runner (ONNX Runtime, OpenVINO or TensorRT, as `vlmopt bench` runs it).

The artifact's files for this tower lie beside this file in `artifact/`, its manifest record in
`artifact.json`. Triton's dynamic batcher hands over several requests at once: their inputs are joined
along the batch axis, run as one batch, and the outputs split back per request.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmopt.runners import ArtifactRunners
from vlmopt.workspace import Artifact


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        artifact = Artifact.from_json(json.loads((folder / "artifact.json").read_text()))
        tower = artifact.towers[params["tower"]].tower
        threads = int(params.get("threads", "0")) or None
        self.runners = ArtifactRunners(folder / "artifact", artifact, threads=threads)
        self.runner = self.runners.runner(tower)
        self.inputs = {i["name"]: pb_utils.triton_string_to_numpy(i["data_type"]) for i in config["input"]}
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy().astype(dtype) for name, dtype in self.inputs.items()} for r in requests]
        counts = [len(next(iter(feed.values()))) for feed in feeds]
        batch = {name: np.concatenate([feed[name] for feed in feeds]) for name in self.inputs}
        outputs = self.runner.run(batch)
        responses, start = [], 0
        for count in counts:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(outputs[name][start : start + count])) for name in self.outputs]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += count
        return responses

    def finalize(self):
        self.runner.close()
        self.runners.close()
