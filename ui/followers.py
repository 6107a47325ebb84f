"""Followers: the page's updates after an event (the latency panel, Live's toggle and note, the estimate), sent
as one unqueued request instead of one each.

Each `.success(fn, ...)` is a request of its own from the browser to the server once the event has answered, and
they leave together as the answer arrives: after a text-to-image generation, three (the latency panel, Live's
toggle and note, the estimate), each a Gradio request with its own session lookup, pre- and postprocessing, on
the cores the next generation runs on. One request runs them all, in the order they were added, each with its own
inputs and outputs: the page gets the same updates (benchmarks.floor --browser, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr


@dataclass(frozen=True)
class Follower:
    """One update: fn(*inputs' values) -> a value for each output (one output: the value itself)."""

    fn: Callable[..., Any]
    inputs: tuple[gr.components.Component, ...]
    outputs: tuple[gr.components.Component, ...]


class Followers:
    """The updates to run after one event; attach() wires them as one `.success` event."""

    def __init__(self) -> None:
        self._all: list[Follower] = []

    def add(self, fn: Callable[..., Any], inputs: list, outputs: list) -> None:
        """An update to run after the event (no output may be another update's too)."""
        taken = {id(c) for f in self._all for c in f.outputs}
        if any(id(c) in taken for c in outputs):
            raise ValueError(f"{fn.__name__}: an output is already another follower's")
        self._all.append(Follower(fn, tuple(inputs), tuple(outputs)))

    def run(self, *values: Any) -> list[Any]:
        """Every update, each given its own slice of the values; their outputs, in order."""
        out: list[Any] = []
        at = 0
        for follower in self._all:
            result = follower.fn(*values[at:at + len(follower.inputs)])
            at += len(follower.inputs)
            out.extend(result if len(follower.outputs) > 1 else [result])
        return out

    def attach(self, event: gr.events.Dependency) -> None:
        """One unqueued request after `event` succeeds, for all of them (none: nothing)."""
        if not self._all:
            return
        event.success(self.run, inputs=[c for f in self._all for c in f.inputs],
                      outputs=[c for f in self._all for c in f.outputs], queue=False, api_visibility="private")
