"""Which strings meterhub accepts from a gateway (sans-I/O): the same rule for every database.

PostgreSQL refuses a NUL character in a text column and SQLite stores it; lone UTF-16 surrogates
(``"\\ud800"`` in JSON) cannot even be encoded as UTF-8. So every string a gateway sends that reaches
storage is checked here, before any database sees it:

- identifiers (request_id, cid, product_id, a data point id given as a string, the short sync fields
  such as vendor_code or mac_address): no control character at all (Unicode category Cc: U+0000-U+001F,
  U+007F-U+009F) and no surrogate (U+D800-U+DFFF);
- free text (device_name, device_desc, install_location, string data point values, strings inside a
  raw object): the same, except that tab, line feed and carriage return are allowed.

A string that breaks the rule is a value outside what the field allows: 1101 (the caller raises it).
"""

from __future__ import annotations

import re

__all__ = ["bad_identifier", "bad_text", "clean_text", "describe_bad"]

_BAD_IDENTIFIER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def bad_identifier(value: str) -> bool:
    """True when ``value`` holds a control character or a surrogate."""
    if value.isascii() and value.isprintable():  # the common case, without the regex
        return False
    return _BAD_IDENTIFIER.search(value) is not None


def bad_text(value: str) -> bool:
    """True when ``value`` holds a surrogate or a control character other than tab, LF and CR."""
    if value.isascii() and value.isprintable():
        return False
    return _BAD_TEXT.search(value) is not None


def describe_bad(value: str, *, free_text: bool = False) -> str:
    """Human text naming the first offending character (for logs), e.g. ``"U+0000 at 3"``."""
    found = (_BAD_TEXT if free_text else _BAD_IDENTIFIER).search(value)
    if found is None:
        return "no offending character"
    kind = "surrogate" if 0xD800 <= ord(found.group()) <= 0xDFFF else "control character"
    return f"{kind} U+{ord(found.group()):04X} at {found.start()}"


def clean_text(value: str) -> str:
    """``value`` with every offending character (free-text rule) replaced by U+FFFD."""
    return _BAD_TEXT.sub("\ufffd", value) if bad_text(value) else value
