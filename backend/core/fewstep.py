"""Few-step models: which kind a model is (from --few-step or its scheduler config) and how it runs.

A few-step model (SD-Turbo, or SD2.1-base with an LCM / TCD LoRA fused in) makes an image in 1-4
steps without classifier-free guidance: no negative prompt, no second UNet batch. Each kind has its
scheduler (schedulers.py) and its default steps:

- turbo: SD-Turbo (stabilityai/sd-turbo) ships `scheduler_config.json` with EulerDiscreteScheduler and
  `"timestep_spacing": "trailing"` (huggingface.co/stabilityai/sd-turbo, scheduler/scheduler_config.json);
  it runs Euler ancestral over trailing timesteps, 1 step by default: it was distilled (adversarial
  diffusion distillation) to make the image in one step; more steps add detail, not quality.
- lcm / tcd: LCMScheduler / TCDScheduler, 4 steps by default: the LCM-LoRA and TCD papers and diffusers'
  guides use 4 steps; 1-2 give blurry images with these LoRAs.
"""

from __future__ import annotations

from typing import Any, Mapping

FEW_STEP_CHOICES = ("auto", "off", "turbo", "lcm", "tcd")  # --few-step
MAX_FEW_STEPS = 4  # the steps these models are distilled for; more rarely helps and only costs time

# kind -> (scheduler key, default steps)
FEW_STEP_KINDS: dict[str, tuple[str, int]] = {
    "turbo": ("euler-a-trailing", 1),
    "lcm": ("lcm", 4),
    "tcd": ("tcd", 4),
}


def step_eta(scheduler: str) -> float:
    """The pipeline's `eta` for a scheduler: TCD's gamma 0.3, which h1t/TCD-SD21-base-LoRA's card recommends (the
    pipeline's own default, 0.0, would override TCDScheduler.step's 0.3); 0.0 (diffusers' default) otherwise."""
    return 0.3 if scheduler == "tcd" else 0.0


def kind_from_scheduler_config(config: Mapping[str, Any]) -> str | None:
    """The few-step kind a model's own scheduler config says it is, or None for a CFG model."""
    class_name = config.get("_class_name", "")
    if class_name == "LCMScheduler":
        return "lcm"
    if class_name == "TCDScheduler":
        return "tcd"
    if class_name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler") \
            and config.get("timestep_spacing") == "trailing":
        return "turbo"  # SD-Turbo's own config (see the module docstring); SD2.1's spacing is "leading"
    return None


def few_step_kind(flag: str, scheduler_config: Mapping[str, Any]) -> str | None:
    """--few-step's kind: auto reads the scheduler config, off means a CFG model."""
    if flag not in FEW_STEP_CHOICES:
        raise ValueError(f"--few-step: {flag!r} is not known; choose one of {', '.join(FEW_STEP_CHOICES)}")
    if flag == "auto":
        return kind_from_scheduler_config(scheduler_config)
    return None if flag == "off" else flag


def capability_fields(kind: str | None) -> dict[str, Any]:
    """The Capabilities fields a few-step kind sets (none for a CFG model)."""
    if kind is None:
        return {}
    scheduler, steps = FEW_STEP_KINDS[kind]
    return dict(guidance=False, default_steps=steps, max_steps=MAX_FEW_STEPS, schedulers=(scheduler,))
