"""Triton python-backend model written by `vlmopt package`: embeddings scaled to unit length (L2), as a dual
encoder's image and text embeddings are compared (cosine similarity is then a dot product)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            embeds = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().astype(np.float32)
            norms = np.linalg.norm(embeds, axis=-1, keepdims=True)
            normalized = embeds / np.maximum(norms, np.finfo(np.float32).tiny)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, normalized)]))
        return responses
