"""The errors a user can act on.

Every check that can refuse runs before the host is touched, and each failure is one of these:
the CLI prints its message as one line and exits with status 2, never a traceback.
"""

from __future__ import annotations


class NetsetupError(Exception):
    """A condition the user must fix; the message says what and, where useful, how."""

    exit_code = 2


class BadInput(NetsetupError):
    """An option's value is malformed or inconsistent with another option."""


class NotRoot(NetsetupError):
    pass


class NoEngine(NetsetupError):
    pass


class InterfaceNotFound(NetsetupError):
    pass


class SubnetOverlap(NetsetupError):
    pass


class PortTaken(NetsetupError):
    pass


class DeployFailed(NetsetupError):
    pass


class FirewallFailed(NetsetupError):
    pass


class VerifyFailed(NetsetupError):
    pass


class AddressTaken(NetsetupError):
    """LAN address mode: the address is the host's own, or a device on the LAN answers for it."""
