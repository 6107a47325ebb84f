"""The prompts as the text encoder sees them: its 77-token window, what a longer prompt loses (and the warning that
says so), and an emphasised prompt's tokens, each with its weight (backend/core/emphasis.py)."""

from __future__ import annotations

from ..core import emphasis
from ..core.api import GenerationRequest
from ..core.errors import InvalidRequest

Runs = list[tuple[str, float]]


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


def runs_dropped(tokenizer, runs: Runs) -> str:
    """What of an emphasised prompt's runs lies past the window, as weighted_tokens cuts it (the runs' text, without
    the emphasis syntax), or ''."""
    room = tokenizer.model_max_length - 2  # BOS and EOS take two places
    for i, (text, _) in enumerate(runs):
        ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        if len(ids) <= room:
            room -= len(ids)
            continue
        rest = "".join(t for t, _ in runs[i + 1:])
        try:
            offsets = tokenizer(text, add_special_tokens=False, truncation=False,
                                return_offsets_mapping=True).offset_mapping
            head = text[offsets[room][0]:]
        except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
            head = tokenizer.decode(ids[room:], skip_special_tokens=True)
        return (head + rest).strip()
    return ""


def parsed_prompts(request: GenerationRequest) -> tuple[Runs, Runs]:
    """The prompt's and the negative prompt's emphasis runs; a weight that is no number is the user's to fix."""
    parsed = []
    for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        try:
            parsed.append(emphasis.parse(text or ""))
        except emphasis.EmphasisError as exc:
            raise InvalidRequest(f"{name}: {exc}") from None
    return parsed[0], parsed[1]


def weighted_tokens(tokenizer, runs: Runs) -> tuple[list[int], list[float]]:
    """The text encoder's 77 token ids for emphasis runs, and each token's weight.

    As A1111 does (modules/sd_hijack_clip.py, TextConditionalModel.tokenize_line, read at commit 5ad03e65): each run
    is tokenized alone, without special tokens, and the ids joined, so a token never straddles two weights; BOS, EOS
    and padding weigh 1.0. Where A1111 starts a second 75-token chunk, this keeps today's window, diffusers' own
    (encode_prompt: padding="max_length", truncation=True): BOS, the first 75 tokens, EOS, then the pad token.
    """
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in runs:
        piece = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    room = tokenizer.model_max_length - 2
    ids = [tokenizer.bos_token_id, *ids[:room], tokenizer.eos_token_id]
    weights = [1.0, *weights[:room], 1.0]
    pad = tokenizer.model_max_length - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad


def truncation_warnings(tokenizer, request: GenerationRequest, emphasis_on: bool = False) -> list[str]:
    """A message for each prompt that the text encoder will cut, naming what is dropped (with emphasis on, what
    is dropped of the text with its emphasis syntax removed, as the encoder sees it)."""
    warnings = []
    runs = parsed_prompts(request) if emphasis_on else (None, None)
    for (name, text), parsed in zip((("prompt", request.prompt), ("negative_prompt", request.negative_prompt)), runs):
        if parsed is None:
            dropped = tokens_dropped(tokenizer, text)
        elif emphasis.is_weighted(parsed):
            dropped = runs_dropped(tokenizer, parsed)
        else:
            dropped = tokens_dropped(tokenizer, emphasis.plain_text(parsed))
        if dropped:
            shown = dropped if len(dropped) <= 160 else f"{dropped[:70]} ... {dropped[-70:]}"
            warnings.append(
                f"{name}: longer than the text encoder's {tokenizer.model_max_length} tokens; "
                f"this end was dropped: \"{shown}\""
            )
    return warnings
