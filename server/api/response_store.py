"""Responses kept in memory, so a client can continue a conversation by `previous_response_id` (as OpenAI's
Responses API and vLLM's in-memory store allow) and read or delete a response by its id.

Each stored response keeps its own input items and output items and the id of the response it continued;
a conversation is read by walking that chain, so a long conversation costs each turn once, not once per
turn that followed. The store is bounded: the least recently used responses go first, and a chain whose
earlier turn is gone can no longer be continued (a clear 404, never a silently shorter history). Using a
response keeps the whole chain before it recent.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class StoredResponse:
    response: dict
    """The response body as it was returned (its `store` true)."""
    input_items: list[dict]
    """This turn's input items (not the earlier turns'), each with an `id`."""
    previous_id: str | None = None
    """The response this one continued."""
    output_items: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.output_items = list(self.response.get("output") or ())


class MissingTurnError(LookupError):
    """A response, or an earlier turn of its conversation, is not (or no longer) stored."""

    def __init__(self, response_id: str, missing: str):
        what = "" if missing == response_id else f": its earlier turn {missing!r} is no longer stored"
        super().__init__(f"Previous response with id '{response_id}' not found{what}.")
        self.response_id, self.missing = response_id, missing


class ResponseStore:
    """The most recent `capacity` responses by id (0 keeps none)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"the responses store size must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response: dict, input_items: list[dict], previous_id: str | None) -> None:
        """Keep a finished response, evicting the least recently used beyond capacity."""
        if not self.enabled:
            return
        self._items[response["id"]] = StoredResponse(response, with_ids(input_items), previous_id)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def conversation(self, response_id: str) -> list[dict]:
        """Every item of the conversation up to and including `response_id`'s output, oldest first: each turn's
        input then its output. MissingTurnError where the response or one before it is not stored."""
        chain, current = [], response_id
        while current is not None:
            stored = self._items.get(current)
            if stored is None:
                raise MissingTurnError(response_id, current)
            chain.append((current, stored))
            current = stored.previous_id
        for turn_id, _ in reversed(chain):  # oldest turn first, the response itself last: all of it stays recent
            self._items.move_to_end(turn_id)
        items = []
        for _, stored in reversed(chain):
            items += stored.input_items + stored.output_items
        return items


def with_ids(items: list[dict]) -> list[dict]:
    """Items with an `id` each (OpenAI lists input items by id): a given one is kept."""
    prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
    return [item if item.get("id") else
            {"id": f"{prefixes.get(item.get('type', 'message'), 'item')}_{uuid.uuid4().hex[:24]}", **item}
            for item in items]
