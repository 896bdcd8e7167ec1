"""One model call of a streamed loop, relayed as it streams: its item events placed after the
items of the steps before it (gateway.warm_path numbers them on, in one stream).

A native endpoint's events pass with their output index moved on and an item id that an earlier
step already used made unique; a translated endpoint's chat chunks go through the same conversion
as a single call (gateway.translate.ResponsesStream). The lifecycle events of the call
(created, in_progress, completed…) are the loop's, not the step's: they are left out, and the
call's finished body is kept for the loop. An item the upstream never streamed (a server that
sends only its final event) is sent whole once the call ends.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.render import item_events
from gateway.translate import ResponsesStream

Event = tuple[str, dict[str, Any]]  # type, fields (numbered by the loop's stream)
LIFECYCLE = ("response.created", "response.in_progress", "response.queued")
ENDS = ("response.completed", "response.incomplete")


class StepRelay:
    def __init__(self, *, offset: int, taken: set[str], translated: bool, prefix: str) -> None:
        self.offset = offset  # items of the earlier steps
        self.taken = taken  # item ids the loop has used
        self.prefix = prefix
        self.buffer = b""
        self.renamed: dict[str, str] = {}
        self.streamed: set[str] = set()  # ids of the items this step's events carried
        self.body: dict[str, Any] | None = None  # the call's Responses-shaped body, once it ended
        self.translator = ResponsesStream({}, prefix, lambda body: body) if translated else None
        self.ended = False

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n\n")
        for raw in complete:
            data = next((line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")), None)
            if data is None or self.ended:
                continue
            if data == b"[DONE]":
                events += self.finish()
                continue
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                events += self.translated(parsed) if self.translator is not None else self.native(parsed)
        return events

    def close(self) -> list[Event]:
        """The stream ended: a chat stream that said why it stopped without `[DONE]` is finished too."""
        if not self.ended and self.translator is not None and self.translator.finish_reason is not None:
            return self.finish()
        return []

    def translated(self, chunk: dict[str, Any]) -> list[Event]:
        assert self.translator is not None
        return self.placed(self.translator.feed(chunk))

    def finish(self) -> list[Event]:
        assert self.translator is not None
        self.ended = True
        events = self.placed(self.translator.end())
        self.body = self.translator.body
        return events + self.unstreamed()

    def native(self, event: dict[str, Any]) -> list[Event]:
        kind = event.get("type", "")
        if kind in ENDS:
            self.ended = True
            response = event.get("response")
            self.body = dict(response) if isinstance(response, dict) else None
            if self.body is not None:
                self.body["output"] = [self.own(item) for item in self.body.get("output") or []]
            return self.unstreamed()
        if kind == "response.failed":
            self.ended = True
            return []
        return self.placed([event])

    def placed(self, events: list[dict[str, Any]]) -> list[Event]:
        out: list[Event] = []
        for event in events:
            kind = event.get("type", "")
            if kind in LIFECYCLE or kind in ENDS or not kind.startswith("response."):
                continue
            fields = {name: value for name, value in event.items() if name not in ("type", "sequence_number")}
            if isinstance(fields.get("output_index"), int):
                fields["output_index"] += self.offset
            if isinstance(fields.get("item"), dict):
                fields["item"] = self.own(fields["item"])
                self.streamed.add(fields["item"]["id"])
            if isinstance(fields.get("item_id"), str):
                fields["item_id"] = self.renamed.get(fields["item_id"], fields["item_id"])
            out.append((kind, fields))
        return out

    def own(self, item: Any) -> Any:
        """An item with the id the loop knows it by: one an earlier step used is renamed."""
        if not isinstance(item, dict):
            return item
        given = str(item.get("id") or "item")
        if given not in self.renamed:
            self.renamed[given] = f"{given}_{self.prefix[:12]}" if given in self.taken else given
        return {**item, "id": self.renamed[given]}

    def unstreamed(self) -> list[Event]:
        events: list[Event] = []
        for index, item in enumerate((self.body or {}).get("output") or []):
            if isinstance(item, dict) and item.get("id") not in self.streamed:
                events += item_events(item, self.offset + index)
                self.streamed.add(item["id"])
        return events
