"""The synthetic multi-task suite: string tasks and their composites (tasks), seeded train/test items
(data), and a small char-level Llama backbone pretrained on generic strings of the same alphabet
(backbone). Everything is offline and reproducible from a seed."""
