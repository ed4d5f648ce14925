"""`python -m benchmarks.quality.run`: the training-quality benchmark of Tessera's libraries.

On the synthetic task suite (training.suite) it trains, with the same data, steps, batch size and
learning rate: per-task PEFT LoRAs and one shared LoRA (equal total trainable parameters), Tessera's
library (every regulariser on) and four ablations; serves every system through the real engine and
scores exact match per task, on the base tasks and on composites never trained on. Optional sweeps
(module count, learning rate, training-input noise, input length) write PNG plots.
"""
