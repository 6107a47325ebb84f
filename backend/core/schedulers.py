"""Schedulers: each one's key, its A1111 sampler name, its diffusers class and config, and the cache.

Light at import: diffusers is imported inside the functions that build a scheduler, so `api.py`
(the contract, which imports nothing heavy) can take the keys and names from here.
"""

from __future__ import annotations

import types
from typing import Any

DEFAULT_SCHEDULER = "dpm++2m"  # DPMSolverMultistepScheduler, as in the AWS walk-through

# key -> (the name shown to people and written in infotext (A1111's sampler names),
#         the diffusers class, config overrides on top of the model's own scheduler config).
SCHEDULER_TABLE: dict[str, tuple[str, str, dict[str, Any]]] = {
    DEFAULT_SCHEDULER: ("DPM++ 2M", "DPMSolverMultistepScheduler",
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False)),
    "dpm++2m-karras": ("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                       dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "euler": ("Euler", "EulerDiscreteScheduler", {}),
    "euler-a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIM", "DDIMScheduler", {}),
    "unipc": ("UniPC", "UniPCMultistepScheduler", {}),
    # Few-step models (backend/core/fewstep.py). SD-Turbo: Euler ancestral over trailing timesteps, as diffusers'
    # SD-Turbo docs run it (the first step starts at t=999, where the model was distilled to start).
    "euler-a-trailing": ("Euler a trailing", "EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")),
    # LCM-LoRA and TCD-LoRA: their own schedulers (diffusers' LCMScheduler, TCDScheduler).
    "lcm": ("LCM", "LCMScheduler", {}),
    "tcd": ("TCD", "TCDScheduler", {}),
}
# The schedulers a CFG model offers: the few-step ones above make poor 20-step samplers for it.
CFG_SCHEDULERS: tuple[str, ...] = (DEFAULT_SCHEDULER, "dpm++2m-karras", "euler", "euler-a", "ddim", "unipc")
# key -> name shown to people (the UI's choices, infotext's "Sampler").
SCHEDULERS: dict[str, str] = {key: label for key, (label, _, _) in SCHEDULER_TABLE.items()}


def scheduler_class_and_overrides(key: str) -> tuple[Any, dict[str, Any]]:
    """The diffusers scheduler class and config overrides behind a scheduler key."""
    import diffusers

    if key not in SCHEDULER_TABLE:
        raise KeyError(f"unknown scheduler {key!r}; known: {', '.join(SCHEDULERS)}")
    _, class_name, overrides = SCHEDULER_TABLE[key]
    return getattr(diffusers, class_name), dict(overrides)


def make_scheduler(key: str, base_config: Any):
    """A fresh scheduler of kind `key` from the model's own scheduler config (no weights reloaded)."""
    cls, overrides = scheduler_class_and_overrides(key)
    config = dict(base_config)
    # SD2's config has steps_offset=1; a config without it makes diffusers warn and shift timesteps.
    config["steps_offset"] = max(1, int(config.get("steps_offset") or 0))
    return _starting_at_the_first_timestep(cls.from_config(config, **overrides))


def _starting_at_the_first_timestep(scheduler):
    """Tell the scheduler, each time the pipeline sets its timesteps, that denoising starts at the first.

    Otherwise the first step() looks its position up with `(timesteps == t).nonzero().item()`,
    which on a GPU makes the CPU wait for the first UNet call to finish before it can queue the
    rest of the loop. Text-to-image always starts at index 0, so the answer is the same.
    """
    if hasattr(scheduler, "set_begin_index"):  # DDIM has no step index to look up
        # A bound method, so that a copy of the scheduler (copy.deepcopy) sets its own index.
        scheduler.set_timesteps = types.MethodType(_set_timesteps_from_the_first, scheduler)
    return scheduler


def _set_timesteps_from_the_first(self, *args, **kwargs):
    type(self).set_timesteps(self, *args, **kwargs)  # resets the begin index
    self.set_begin_index(0)


class SchedulerCache:
    """One scheduler per kind, reused across requests (callers run one generation at a time)."""

    def __init__(self, base_config: Any):
        self.base_config = dict(base_config)
        self._by_key: dict[str, Any] = {}

    def get(self, key: str):
        """The scheduler for key, made on first use."""
        if key not in self._by_key:
            self._by_key[key] = make_scheduler(key, self.base_config)
        return self._by_key[key]
