"""Verification, the service every stage and `bench` share: comparing outputs and checking artifacts against their references."""

from vlmopt.verification.check import Gates, evaluation_sets, verify_artifacts, verify_runners
from vlmopt.verification.compare import agreement, compare, compare_feeds, rowwise_cosine, top1

__all__ = ["Gates", "agreement", "compare", "compare_feeds", "evaluation_sets", "rowwise_cosine", "top1", "verify_artifacts", "verify_runners"]
