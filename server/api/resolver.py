"""Adapters loaded on first use from a directory (`--lora-resolver-dir`, as vLLM's filesystem LoRA resolver
and LoRAX's dynamic adapters).

A request that names a model, or a module in `modules`, that the library lacks, where DIR/NAME holds a PEFT
LoRA adapter (`adapter_config.json` and its weights), loads that adapter as module NAME between two engine
steps and is then served with it, as are all later requests. So explicit compositions of adapters nobody
loaded by hand work too: `"modules": {"a": 0.5, "b": 0.5}`. Names follow the library's rule (letters,
digits, '.', '_', '-'), so a name can never reach outside DIR. Requests for the same new adapter wait for
one load. A directory that is not an adapter is left alone: the request gets the usual 404.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from router.info import NAME
from router.text import AUTO
from server.api.errors import APIError


class AdapterResolver:
    def __init__(self, engine, directory: str):
        self.engine = engine
        self.directory = Path(directory).expanduser()
        self._locks: dict[str, asyncio.Lock] = {}

    def wanted(self, body) -> list[tuple[str, str]]:
        """(name, the request parameter that names it) of each adapter `body` asks for that the library lacks
        and the directory holds."""
        backbone, library = self.engine.model_name, self.engine.library
        prefix, sep, rest = body.model.rpartition(":")
        names = [(rest if sep and prefix == backbone else body.model, "model")]
        names += [(name, "modules") for name in body.modules or {}]
        found = []
        for name, param in names:
            if name in (backbone, AUTO) or not NAME.match(name):
                continue
            if library is not None and (name in library.modules or name in library.tasks):
                continue
            if (self.directory / name / "adapter_config.json").is_file():
                found.append((name, param))
        return found

    async def resolve(self, body) -> None:
        """Load every adapter `body` names that the library lacks and the directory holds (400 if one fails)."""
        for name, param in self.wanted(body):
            async with self._locks.setdefault(name, asyncio.Lock()):
                library = self.engine.library
                if library is not None and name in library.modules:  # loaded while this request waited
                    continue
                try:
                    future = await asyncio.to_thread(self._read, name)
                    await asyncio.wrap_future(future)
                except (ValueError, OSError, LookupError) as error:
                    raise APIError(400, f"adapter {name!r} of the LoRA resolver directory could not be loaded: "
                                        f"{error}", param, "invalid_adapter") from None

    def _read(self, name: str):
        """Read and check DIR/NAME (in a worker thread); the engine's future that adds it between steps."""
        from router.peft_io import import_peft

        path = self.directory / name
        info, weights = import_peft(str(path), self.engine.fingerprint, name,
                                    f"PEFT adapter {path}, loaded on first use")
        return self.engine.add_module(info, weights)
