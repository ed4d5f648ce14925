"""Which modules sit in which device slots, and which must stay there.

A running request pins its modules' slots; a slot nobody pins may be evicted, least recently used
first, when another module needs room. A request whose modules cannot all get slots waits: it never runs
without them.
"""

from __future__ import annotations

from collections import OrderedDict


class ModulePool:
    """Residency and pinning of modules in `num_slots` device slots."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._free = list(range(num_slots))[::-1]
        self._generations: dict[str, int] = {}

    def generation(self, module_id: str) -> int:
        """How often `module_id` was forgotten: weights served under one name and generation never change, so
        the prefix cache keys KV on it."""
        return self._generations.get(module_id, 0)

    def slot_of(self, module_id: str) -> int | None:
        return self._slot_of.get(module_id)

    def acquire(self, module_ids: tuple[str, ...]) -> tuple[tuple[int, ...], list[tuple[int, str]]] | None:
        """Pin `module_ids`, making them resident; (their slots, the loads this needs) or None.

        None means they cannot all be resident now (every other slot is pinned); nothing changes then.
        """
        missing = [m for m in module_ids if m not in self._slot_of]
        evictable = [m for m in self._idle if m not in module_ids]
        if len(missing) > len(self._free) + len(evictable):
            return None
        loads = []
        for module_id in missing:
            if not self._free:
                victim = evictable.pop(0)  # least recently used first, never one of this request's own modules
                del self._idle[victim]
                self._free.append(self._slot_of.pop(victim))
            slot = self._free.pop()
            self._slot_of[module_id] = slot
            loads.append((slot, module_id))
        for module_id in module_ids:
            self._pins[module_id] = self._pins.get(module_id, 0) + 1
            self._idle.pop(module_id, None)
        return tuple(self._slot_of[m] for m in module_ids), loads

    def release(self, module_ids: tuple[str, ...]) -> None:
        """Unpin; a module nobody pins stays resident but becomes evictable (most recent last)."""
        for module_id in module_ids:
            self._pins[module_id] -= 1
            if self._pins[module_id] == 0:
                del self._pins[module_id]
                self._idle[module_id] = None

    def forget(self, module_id: str) -> None:
        """Drop an unpinned module's residency (it left the library): its slot is free, and a module loaded
        later under the same name is loaded afresh, never served from the old slot."""
        if module_id in self._pins:
            raise ValueError(f"module {module_id!r} is pinned by a running request")
        self._generations[module_id] = self.generation(module_id) + 1
        self._idle.pop(module_id, None)
        slot = self._slot_of.pop(module_id, None)
        if slot is not None:
            self._free.append(slot)

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    @property
    def pinned(self) -> tuple[str, ...]:
        """Modules running requests use."""
        return tuple(self._pins)

    @property
    def num_pinned(self) -> int:
        return len(self._pins)
