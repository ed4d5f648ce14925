"""`tessera bench`: a latency and throughput benchmark for any OpenAI-compatible streaming server.

Load is Poisson (or gamma-bursty) arrivals at given rates, or a fixed concurrency; requests carry
random or dataset prompts and task tags (as the `model` field, the X-Tessera-Task header, the body's
`task`, or explicit `modules` compositions), so the same run works against Tessera and vLLM.
`benchmarks.serving.runner.benchmark(BenchConfig(...))` runs it from Python; it needs the `bench`
extra (matplotlib, tqdm), which this package's import does not.

`bench_engine.py` is the offline counterpart: Tessera's engine in process against transformers `generate`
and PEFT's mixed-adapter batch on the same random model (no web stack needed).
"""
