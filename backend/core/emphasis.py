"""A1111 prompt emphasis: `(text:w)`, `(text)` x1.1, `[text]` /1.1, nesting, `\\(` escapes -> (text, weight) runs.

The rules are AUTOMATIC1111's (stable-diffusion-webui, modules/prompt_parser.py, `parse_prompt_attention`, read at
commit 28bd8e142d5f77b71ae8d7d7140b5da1b3a49906), written here anew; its docstring's examples are the tests
(tests/test_emphasis.py). What A1111 does, and so this does:
- `(` and `[` open a group; `)` and `]` close the innermost open group of their own kind; `:NUMBER)` (spaces
  allowed around the number) closes the innermost `(` with that weight. Nested weights multiply.
- A closer with no open group of its kind, a `:` that is not a weight, and anything else is plain text.
- Groups left open at the end still count: every `(` then every `[` applies to all text after it.
- `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the literal characters; a lone backslash is dropped.
- Neighbouring runs of equal weight are joined (so a prompt without emphasis is one run of weight 1.0).
The floats are multiplied in A1111's order (groups as they close, then the open ones), so the weights are its
exact values (1.3 x 1.1 x 1.1 = 1.5730000000000004, as its docstring prints).
One difference: A1111 splits a prompt at `BREAK` into 75-token chunks, each encoded apart; this app encodes one
77-token window (backend/inprocess/prompts.py), so `BREAK` is plain text here, as the tokenizer saw it before.
No torch: backend/core imports none.
"""

from __future__ import annotations

import re

ROUND = 1.1  # `(text)`: A1111's round-bracket multiplier
SQUARE = 1 / 1.1  # `[text]`: A1111's square-bracket multiplier

# One lexical piece per match, tried in this order: an escape, a lone backslash, an opener, a weight closer,
# a closer, a run of plain text, a colon that is not a weight. Every character falls in exactly one piece.
_PIECES = re.compile(r"""
    (?P<escape>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)


class EmphasisError(ValueError):
    """A weight that looks like a number to the syntax but is none (`(cat:1.2.3)`)."""


def parse(prompt: str) -> list[tuple[str, float]]:
    """`prompt` as A1111 reads its emphasis: runs of (text, weight), at least one (("", 1.0) for an empty prompt)."""
    runs: list[list] = []  # [text, weight], weights multiplied in place as groups close
    open_groups: list[tuple[str, int]] = []  # (kind, index of the first run inside it), innermost last

    def close(kind: str, factor: float) -> bool:
        """Weigh the runs of the innermost open group of `kind`; False if none is open."""
        for i in range(len(open_groups) - 1, -1, -1):
            if open_groups[i][0] == kind:
                _, start = open_groups.pop(i)
                for run in runs[start:]:
                    run[1] *= factor
                return True
        return False

    for piece in _PIECES.finditer(prompt):
        if piece["escape"]:
            runs.append([piece["escape"][1], 1.0])
        elif piece["backslash"]:
            runs.append(["", 1.0])
        elif piece["open"]:
            open_groups.append((piece["open"], len(runs)))
        elif piece["weight"] is not None and any(kind == "(" for kind, _ in open_groups):
            try:
                weight = float(piece["weight"])
            except ValueError:
                raise EmphasisError(f"{piece[0]!r} is not a weight: write (text:1.2), or \\( \\) for literal "
                                    f"parentheses") from None
            close("(", weight)
        elif piece["weight"] is not None:  # no `(` to close: text, as A1111 leaves it
            runs.append([piece[0], 1.0])
        elif piece["close"]:
            if not close("(" if piece["close"] == ")" else "[", ROUND if piece["close"] == ")" else SQUARE):
                runs.append([piece["close"], 1.0])
        else:
            runs.append([piece["text"], 1.0])
    # Unclosed groups: A1111 applies every open `(` first, then every open `[`, each from where it opened.
    for kind, factor in (("(", ROUND), ("[", SQUARE)):
        for open_kind, start in open_groups:
            if open_kind == kind:
                for run in runs[start:]:
                    run[1] *= factor
    joined: list[tuple[str, float]] = []
    for text, weight in runs:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + text, weight)
        else:
            joined.append((text, weight))
    return joined or [("", 1.0)]


def plain_text(runs: list[tuple[str, float]]) -> str:
    """The text the tokenizer sees: the runs joined, the emphasis syntax gone."""
    return "".join(text for text, _ in runs)


def is_weighted(runs: list[tuple[str, float]]) -> bool:
    """Whether any run's weight differs from 1.0 (else the text encoder's output is used as it is)."""
    return any(weight != 1.0 for _, weight in runs)
