"""Where a model runs: the one rule every command and library entry point goes through.

``None`` or ``"auto"``: the best device available (a CUDA GPU when torch sees one, else the CPU). Anything else is
used as asked, except a CUDA device when torch sees none: that is a one-line :class:`DeviceError`, not a crash
later inside torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.core.errors import DeviceError, option

if TYPE_CHECKING:
    import torch


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device ``device`` names, by the rule of this module."""
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"{option('device')} {device!r} is not a device ({exc}): use auto, cpu or cuda[:N]") from None
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{option('device')} {device} was asked for, but no CUDA device is available: use "
                          f"{option('device')} auto or cpu")
    return picked
