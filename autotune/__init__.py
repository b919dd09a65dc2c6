"""reasoning-autotune: find the best parallel layout for serving reasoning workloads with vLLM."""

__version__ = "0.1.0"
