"""Triton kernels (one per file, each with its launcher)."""
