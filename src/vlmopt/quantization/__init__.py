"""Quantization helpers beyond ONNX Runtime's own tools: accuracy-aware fallback."""
