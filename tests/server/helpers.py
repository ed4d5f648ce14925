"""Step metadata built by hand for model tests (the engine's runner builds it for real)."""

from __future__ import annotations

import pytest
import torch

from server.model.forward_context import BatchMetadata


class PagedSequences:
    """Sequences growing in a paged KV cache with a naive block allocator: enough to drive the model."""

    def __init__(self, backbone, num_blocks: int = 64, block_size: int = 4, max_tokens: int = 256):
        self.backbone = backbone
        self.block_size = block_size
        shape = (num_blocks, block_size, backbone.num_kv_heads, backbone.head_dim)
        self.caches = [
            (torch.zeros(shape, dtype=backbone.dtype), torch.zeros(shape, dtype=backbone.dtype))
            for _ in range(backbone.num_layers)
        ]
        backbone.bind_kv_cache(self.caches)
        self.free = list(range(num_blocks))[::-1]
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.max_tokens = max_tokens

    def metadata(self, chunks: list[tuple[int, list[int]]], modules=None) -> BatchMetadata:
        """Metadata for a step where sequence `seq` appends tokens `ids`, for each (seq, ids)."""
        meta = BatchMetadata.allocate(self.max_tokens, len(chunks), 64, modules, "cpu")
        ids, positions, slots, cu = [], [], [], [0]
        for i, (seq, tokens) in enumerate(chunks):
            start = self.lengths.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            for p in range(start, start + len(tokens)):
                if p // self.block_size >= len(table):
                    table.append(self.free.pop())
                slots.append(table[p // self.block_size] * self.block_size + p % self.block_size)
                positions.append(p)
            ids += tokens
            self.lengths[seq] = start + len(tokens)
            cu.append(cu[-1] + len(tokens))
            meta.block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
            meta.seq_lens[i] = self.lengths[seq]
        n = len(ids)
        meta.input_ids[:n] = torch.tensor(ids)
        meta.positions[:n] = torch.tensor(positions)
        meta.slot_mapping[:n] = torch.tensor(slots)
        meta.cu_query_lens[: len(cu)] = torch.tensor(cu, dtype=torch.int32)
        meta.logits_indices[: len(chunks)] = torch.tensor(cu[1:]) - 1
        meta.num_tokens, meta.num_seqs = n, len(chunks)
        meta.max_query_len = max(len(t) for _, t in chunks)
        meta.max_seq_len = max(self.lengths[s] for s, _ in chunks)
        meta.has_modules = modules is not None and bool((modules.token_slots >= 0).any())
        return meta


def assert_edited_checkpoints_fail(model_dir: str, tmp_path, cases) -> None:
    """For each (name, edit, message): `model_dir`'s config and its safetensors with `edit(tensors)` applied, in a
    directory of their own, must fail to load with a ValueError matching `message`."""
    from safetensors.torch import load_file, save_file

    from server.model.loader import load_backbone

    tensors = load_file(f"{model_dir}/model.safetensors")
    for name, edit, message in cases:
        target = tmp_path / name
        target.mkdir()
        (target / "config.json").write_text(open(f"{model_dir}/config.json").read())
        edited = dict(tensors)
        edit(edited)
        save_file(edited, str(target / "model.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_backbone(str(target))
