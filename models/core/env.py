"""ldot's switches in the environment (``LDOT_DEBUG``, ``LDOT_NO_PROGRESS``, ``LDOT_NO_SERVER``, ...), read one way.

A switch is on when it holds anything but ``''``, ``0``, ``false``, ``no`` or ``off`` (any case, spaces
ignored); unset is off. So ``LDOT_NO_PROGRESS=0`` shows progress, as ``LDOT_DEBUG=0`` hides tracebacks.
"""

from __future__ import annotations

import os

OFF = frozenset({"", "0", "false", "no", "off"})


def flag(name: str) -> bool:
    """Whether the switch ``name`` is on (read now, not at import)."""
    return os.environ.get(name, "").strip().lower() not in OFF
