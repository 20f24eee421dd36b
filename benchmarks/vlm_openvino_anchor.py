"""One timed generation of optimum-intel's OpenVINO export (`OVModelForVisualCausalLM`): `make bench-vlm`'s anchor.

Run by `benchmarks/vlm.py` with the python of optimum-intel's own environment (its pins clash with vlmopt's:
transformers < 4.58 for these families' export), so it imports neither vlmopt nor anything the anchor's
environment lacks. It reads the prompt as `generate` takes it (written by vlm.py with vlmopt's own preprocessor, so
both sides time the same tokens and pixels) and prints one JSON line, after a 2-token warm-up generation: time to first token, decode tokens/s over the
steps after the first, peak RSS.

  python vlm_openvino_anchor.py OV_FOLDER PROMPT.npz NEW_TOKENS THREADS
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    folder, inputs, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from importlib.metadata import version

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import openvino
    import torch
    from optimum.intel import OVModelForVisualCausalLM
    from transformers.generation.streamers import BaseStreamer
    from vlm import peak_rss_mb  # vlm.py imports nothing at module level that this environment lacks

    torch.set_num_threads(threads)
    ov_config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}
    model = OVModelForVisualCausalLM.from_pretrained(folder, ov_config=ov_config, compile=True)
    loaded = dict(np.load(inputs))
    eos = [int(t) for t in loaded.pop("eos_token_id")]
    pad = int(loaded.pop("pad_token_id"))
    kwargs = {name: torch.from_numpy(value) for name, value in loaded.items()}
    stamps: list[float] = []

    class Stream(BaseStreamer):
        """transformers hands the prompt first, then each step's tokens."""

        prompt_seen = False

        def put(self, value: object) -> None:
            if self.prompt_seen:
                stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            return None

    with torch.inference_mode():  # one 2-token warm-up generation, as vlm.py's contenders get (first-inference set-up is not TTFT)
        model.generate(**kwargs, max_new_tokens=2, min_new_tokens=2, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad, streamer=Stream())
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    language = os.path.join(folder, "openvino_language_model.bin")
    print(
        json.dumps(
            {
                "image_encode_s": None,
                "ttft_s": stamps[0] - started,
                "decode_tokens_per_s": decode,
                "prompt_tokens": int(kwargs["input_ids"].shape[1]),
                "new_tokens": len(stamps),
                "peak_rss_mb": peak_rss_mb(),
                "decoder_bytes_per_token": os.path.getsize(language),
                "text": f"optimum-intel {version('optimum-intel')}, openvino {openvino.__version__}",
            }
        )
    )


if __name__ == "__main__":
    main()
