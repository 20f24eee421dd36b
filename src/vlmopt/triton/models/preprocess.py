"""Triton python-backend model written by `vlmopt package`: raw data in, a tower's inputs out.

`kind` "image": each item is an encoded image (bytes: JPEG, PNG, ...) made into `pixel_values` by the model's
saved image processor; "text": each item is UTF-8 text made into token ids (and mask) by the saved tokenizer,
padded to the tower's length so that requests batch together. The processor lies beside this file, in
`processor/`. A request whose data cannot be read gets an error of its own; the others in its batch are served.
"""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "processor"
        self.kind = params["kind"]
        self.input_name = config["input"][0]["name"]
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        if self.kind == "image":
            from PIL import Image
            from transformers import AutoImageProcessor

            Image.MAX_IMAGE_PIXELS = int(params["max_image_pixels"])
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.max_length = int(params["max_length"])
            self.max_text_bytes = int(params["max_text_bytes"])

    def _image(self, data):
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")

    def _text(self, data):
        if len(data) > self.max_text_bytes:
            raise ValueError(f"text of {len(data)} bytes is longer than the {self.max_text_bytes} this model takes")
        text = data.decode("utf-8")
        if not text.strip():
            raise ValueError("empty text")
        return text

    def _decode(self, data):
        from PIL import UnidentifiedImageError

        try:
            return self._image(data) if self.kind == "image" else self._text(data)
        except UnidentifiedImageError:
            raise ValueError("cannot read the image: not an image file PIL knows (JPEG, PNG, ...)") from None
        except Exception as exc:  # one bad item fails its own request only
            raise ValueError(f"cannot read the {self.kind}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None

    def _process(self, items):
        if self.kind == "image":
            arrays = {"pixel_values": self.processor(images=items, return_tensors="np")["pixel_values"]}
        else:
            arrays = dict(self.tokenizer(items, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="np"))
        return {name: np.ascontiguousarray(arrays[name], dtype=dtype) for name, dtype in self.outputs.items()}

    def execute(self, requests):
        responses = [None] * len(requests)
        items, owners = [], []
        for index, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            try:
                decoded = [self._decode(bytes(x)) for x in raw]
            except ValueError as exc:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            items += decoded
            owners.append((index, len(decoded)))
        if items:
            arrays = self._process(items)
            start = 0
            for index, count in owners:
                tensors = [pb_utils.Tensor(name, array[start : start + count]) for name, array in arrays.items()]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += count
        return responses
