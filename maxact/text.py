"""User text (paths, names, token texts, messages) shown literally: never read as markup, and with
bidirectional control characters made visible, in the terminal and in the report's pages."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape

#: The Unicode bidirectional embedding, override and isolate controls (U+202A-U+202E,
#: U+2066-U+2069): they reorder how the text around them is displayed ("Trojan Source").
BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")


def visible(text: object) -> str:
    """``text`` as a string with each bidirectional control written as its escape (``\\u202e``)."""
    return BIDI_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", str(text))


def literal(text: object) -> str:
    """``text`` made safe inside a rich markup string: :func:`visible`, with ``[`` escaped, so that
    ``[/x]`` or ``[v2]`` prints as written (use it for every user-derived part of a message)."""
    return escape(visible(text))


def plain_console(**kwargs) -> Console:
    """A rich console that leaves ``:name:`` in text alone (no emoji codes); ``kwargs`` go to
    :class:`rich.console.Console` (e.g. ``stderr=True``)."""
    return Console(emoji=False, **kwargs)
