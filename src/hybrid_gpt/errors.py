"""Errors that the CLI turns into one clear line and an exit status.

Library code raises these instead of calling ``sys.exit``; the CLI catches them.
"""


class HybridGPTError(Exception):
    """Bad input or configuration that the user can fix: exit status 2."""

    exit_code = 2


class RunFailure(HybridGPTError):
    """A run that started correctly but could not finish (I/O, divergence): exit status 1."""

    exit_code = 1
