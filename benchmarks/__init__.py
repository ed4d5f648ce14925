"""Benchmarks: kernels (GPU scripts), serving latency against any OpenAI-compatible server."""
