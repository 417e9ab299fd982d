"""Read a LIBERO task's goal from its BDDL file: `(:goal (And (On obj target) ...))` -> predicates.

The scripted expert only needs the pick-and-place predicates (`On`, `In`); anything else is
returned too so callers can refuse tasks they cannot do with a clear message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from evalkit.errors import BadInput


@dataclass(frozen=True)
class Predicate:
    name: str  # lower-case predicate, e.g. "on", "in", "open"
    args: tuple[str, ...]


def _tokens(text: str) -> list[str]:
    text = re.sub(r";[^\n]*", "", text)  # BDDL comments
    return re.findall(r"\(|\)|[^\s()]+", text)


def _parse(tokens: list[str], i: int = 0):
    """S-expression parser: returns (nested lists of strings, next index)."""
    if tokens[i] != "(":
        return tokens[i], i + 1
    out, i = [], i + 1
    while tokens[i] != ")":
        item, i = _parse(tokens, i)
        out.append(item)
    return out, i + 1


def parse_section_text(text: str, section: str) -> list[Predicate]:
    """Flat predicates of a BDDL section (':goal' or ':init'); an (And ...) wrapper is unwrapped."""
    toks = _tokens(text)
    try:
        start = next(k for k in range(len(toks) - 1) if toks[k] == "(" and toks[k + 1].lower() == section)
    except StopIteration:
        raise BadInput(f"BDDL has no ({section} ...) section") from None
    expr, _ = _parse(toks, start)
    if section == ":init":
        items = expr[1:]
        body = ["and", *items]
    else:
        body = expr[1] if len(expr) > 1 else []
    if isinstance(body, list) and body and isinstance(body[0], str) and body[0].lower() == "and":
        items = body[1:]
    else:
        items = [body]
    preds = []
    for it in items:
        if not isinstance(it, list) or not it or not all(isinstance(a, str) for a in it):
            raise BadInput(f"unsupported goal term {it!r} (only flat predicates are handled)")
        preds.append(Predicate(it[0].lower(), tuple(it[1:])))
    return preds


def parse_goal_text(text: str) -> list[Predicate]:
    return parse_section_text(text, ":goal")


@lru_cache(maxsize=256)
def parse_goal(bddl_path: str) -> tuple[Predicate, ...]:
    with open(bddl_path) as f:
        return tuple(parse_goal_text(f.read()))


@lru_cache(maxsize=256)
def parse_init(bddl_path: str) -> tuple[Predicate, ...]:
    with open(bddl_path) as f:
        return tuple(parse_section_text(f.read(), ":init"))
