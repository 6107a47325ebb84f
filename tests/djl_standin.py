"""Stands in for DJL-Serving's `djl_python` package, which only exists inside the DJL container.

It keeps the contract serving/model.py relies on, as djl_python's inputs.py and outputs.py define
it: Input holds properties (request headers, or the model's properties on the warm-up call) and
content; get_as_bytes returns the "data" entry or else the first one, as a bytearray; get_as_json
parses it; is_empty is true when there is no content. Output collects properties (which DJL sends
as response headers) and content; error() sets the code and writes the JSON body
{"code", "message", "error"} with content-type application/json. Tests install this module as
`djl_python` through sys.modules.
"""

from __future__ import annotations

import json
from typing import Any


class Input:
    """A request as DJL hands it to the Python engine."""

    def __init__(self, properties: dict[str, str] | None = None, content: bytes | None = None):
        self.properties: dict[str, str] = dict(properties or {})
        self._content: list[tuple[str, bytearray]] = []
        if content is not None:
            self._content.append(("data", bytearray(content)))

    def get_properties(self) -> dict[str, str]:
        """The properties, as DJL passes them."""
        return self.properties

    def get_property(self, key: str) -> str | None:
        """One property, whatever the case of its name."""
        return next((v for k, v in self.properties.items() if k.lower() == key.lower()), None)

    def is_empty(self) -> bool:
        """True when there is no content (DJL's warm-up call)."""
        return not self._content

    def get_as_bytes(self, key: str | None = None) -> bytearray | None:
        """The content: the entry named key, else "data", else the first; None when empty."""
        if not self._content:
            return None
        entries = dict(self._content)
        if key:
            if key not in entries:
                raise KeyError(f"requested data for key:{key} is not found!")
            return entries[key]
        return entries.get("data", self._content[0][1])

    def get_as_string(self, key: str | None = None) -> str:
        """The content decoded as UTF-8."""
        return self.get_as_bytes(key).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        """The content parsed as JSON."""
        return json.loads(self.get_as_bytes(key).decode("utf-8"))


class Output:
    """An answer as the Python engine returns it to DJL."""

    def __init__(self, code: int = 200, message: str = "OK"):
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content: list[tuple[str | None, bytearray]] = []

    def set_code(self, code: int) -> "Output":
        """Set the HTTP status."""
        self.code = code
        return self

    def set_message(self, message: str) -> "Output":
        """Set the HTTP reason phrase."""
        self.message = message
        return self

    def error(self, error: str, code: int = 424, message: str = "prediction failure") -> "Output":
        """An error answer, as djl_python writes it."""
        self.code = code
        self.message = message
        self.add_property("content-type", "application/json")
        self.add_as_json({"code": self.code, "message": self.message, "error": error})
        return self

    def add_property(self, key: str, val: str) -> "Output":
        """A property, sent as a response header."""
        self.properties[key] = val
        return self

    def add(self, value: Any, key: str | None = None) -> "Output":
        """Content: str as UTF-8, bytes as is, anything else as JSON."""
        if type(value) is str:
            self.content.append((key, bytearray(value.encode("utf-8"))))
        elif type(value) in (bytes, bytearray):
            self.content.append((key, bytearray(value)))
        else:
            self.add_as_json(value, key=key)
        return self

    def add_as_json(self, val: Any, key: str | None = None) -> "Output":
        """Content as JSON (djl_python's formatting)."""
        text = json.dumps(val, ensure_ascii=False, allow_nan=False, indent=2, separators=(",", ":"))
        self.content.append((key, bytearray(text.encode("utf-8"))))
        return self

    def body(self) -> bytes:
        """What DJL would send as the response body (the first content entry; tests only)."""
        return bytes(self.content[0][1]) if self.content else b""
