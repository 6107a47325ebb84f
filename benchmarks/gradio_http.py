"""Gradio's HTTP API as curl and a browser's queue call it: POST /gradio_api/call/<api>, then its event stream to
`complete` (gradio's docs, "Querying Gradio Apps with Curl"). One place for the benchmarks that call the app so."""

from __future__ import annotations

import json
from typing import Any, Iterator

from backend.core.schedulers import DEFAULT_SCHEDULER

# /generate's last five API inputs, the hires fix's (enable_hr, hr_scale, hr_upscaler, hr_steps, denoising_strength)
# with enable_hr False: off. Gradio's positional form must send every input; gradio_client fills them in itself.
HIRES_OFF = (False, 1.5, "latent", 0, 0.7)


def generate_inputs(prompt: str, seed: int, steps: int, size: int, guidance_scale: float = 7.5,
                    preview: bool = False) -> list[Any]:
    """/generate's 16 API inputs, in order: prompt, negative prompt, steps, precision (fp32), guidance, seed, scheduler,
    width, height, one image, preview, then the hires fix's, off."""
    return [prompt, "", steps, "fp32", guidance_scale, seed, DEFAULT_SCHEDULER, size, size, 1, preview, *HIRES_OFF]


def post_call(http, body: dict[str, Any], api: str = "generate") -> str:
    """POST a call on an httpx client; its event id."""
    return http.post(f"/gradio_api/call/{api}", json=body).raise_for_status().json()["event_id"]


def stream_events(http, event_id: str, api: str = "generate") -> Iterator[tuple[str, str]]:
    """The call's event stream: (event, its data as sent: JSON text) for each data line, `generating` (one per value
    a generator yields, the last one the result again), then `complete` or `error`, where it ends. Left unparsed:
    a caller that wants only the answer (the timed benchmarks) parses that one alone."""
    event = None
    with http.stream("GET", f"/gradio_api/call/{api}/{event_id}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event is not None:
                yield event, line.partition(":")[2]
                if event in ("complete", "error"):
                    return


def read_answer(http, event_id: str, api: str = "generate") -> list[Any]:
    """The call's event stream read to its `complete` event: the outputs; RuntimeError on an `error` event."""
    event, answer = None, None
    for event, data in stream_events(http, event_id, api):
        if event in ("complete", "error"):
            answer = json.loads(data)
    if event != "complete":
        raise RuntimeError(f"the server answered {event}: {answer}")
    return answer
