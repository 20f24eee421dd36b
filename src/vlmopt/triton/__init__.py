"""Triton Inference Server model repositories: model configurations built on Triton's own schema, and the
python-backend models (pre-processing, normalization, vlmopt's runner) copied into a repository as `model.py`.

`vlmopt.stages.package` decides what goes into a repository; this room knows how Triton wants it written.
"""
