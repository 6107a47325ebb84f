"""Prompts longer than the text encoder's window: what it drops, and the warning that says so."""

from __future__ import annotations

from ..core.api import GenerationRequest


def tokens_dropped(tokenizer, text: str) -> str:
    """The part of `text` past the text encoder's window (77 tokens with BOS/EOS), or ''."""
    if not text:
        return ""
    limit = tokenizer.model_max_length
    try:
        enc = tokenizer(text, truncation=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        ids = tokenizer(text, truncation=False).input_ids
        return "" if len(ids) <= limit else tokenizer.decode(ids[limit - 1:-1], skip_special_tokens=True).strip()
    if len(enc.input_ids) <= limit:
        return ""
    # Token limit-1 is the first one that does not fit (BOS takes one place, EOS the last);
    # its offset points into the text as typed, so the message quotes the user's own words.
    return text[enc.offset_mapping[limit - 1][0]:].strip()


def truncation_warnings(tokenizer, request: GenerationRequest) -> list[str]:
    """A message for each prompt that the text encoder will cut, naming what is dropped."""
    warnings = []
    for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        dropped = tokens_dropped(tokenizer, text)
        if dropped:
            shown = dropped if len(dropped) <= 160 else f"{dropped[:70]} ... {dropped[-70:]}"
            warnings.append(
                f"{name}: longer than the text encoder's {tokenizer.model_max_length} tokens; "
                f"this end was dropped: \"{shown}\""
            )
    return warnings
