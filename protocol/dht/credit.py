"""What a volunteer's node says about itself for credit: a display name, a contact, and what it served.

`join --public-name NAME [--contact URL]` puts them in the node's signed server record (records.py), with
counters the node keeps since it started: tokens through its blocks, sessions opened, seconds up. The names
are shown on dashboards, so they are checked here, on both sides: the node refuses to start with a bad one
(a line naming the flag), and every DHT peer refuses records that carry one.
"""

from __future__ import annotations

import re

MAX_PUBLIC_NAME = 32
MAX_CONTACT = 128
MAX_COUNT = 2**62  # counters beyond this are not plausible (and would not fit msgpack's int64)

_NAME_PUNCTUATION = frozenset(" -_.'")
_CONTACT = re.compile(r"(https?://[^\s/$.?#][^\s]*|mailto:[^\s@]+@[^\s@]+|[^\s@:/]+@[^\s@:/]+\.[^\s@:/]+)")


def validate_public_name(name: str) -> str:
    """A display name: 1-32 letters (any script), digits, spaces and - _ . ' , not starting or ending with a
    space, no two spaces in a row; "" means none. ValueError says what is wrong."""
    if not isinstance(name, str):
        raise ValueError(f"a public name must be text, got {type(name).__name__}")
    if not name:
        return name
    if len(name) > MAX_PUBLIC_NAME:
        raise ValueError(f"a public name is at most {MAX_PUBLIC_NAME} characters, got {len(name)}")
    if name != name.strip() or "  " in name:
        raise ValueError(f"a public name cannot start or end with a space or hold two in a row: {name!r}")
    bad = sorted({c for c in name if not (c.isalnum() or c in _NAME_PUNCTUATION)})
    if bad:
        raise ValueError(f"a public name holds letters, digits, spaces and - _ . ' only, not {''.join(bad)!r}")
    return name


def validate_contact(contact: str) -> str:
    """An http(s) URL, a mailto: link or an e-mail address, at most 128 characters; "" means none."""
    if not isinstance(contact, str):
        raise ValueError(f"a contact must be text, got {type(contact).__name__}")
    if contact and (len(contact) > MAX_CONTACT or not _CONTACT.fullmatch(contact)):
        raise ValueError(
            f"a contact is an http(s):// URL, a mailto: link or an e-mail address of at most {MAX_CONTACT} "
            f"characters, got {contact[: MAX_CONTACT + 1]!r}"
        )
    return contact


def validate_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{name} must be an int in [0, {MAX_COUNT}], got {value!r}")
    return value
