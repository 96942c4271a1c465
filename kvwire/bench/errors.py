"""The typed errors of ``kvwire-bench``.

Owns: the bench's exception classes and the exit code each maps to. Must not know anything else.
"""

from __future__ import annotations

from ..errors import KvwireError

EXIT_OK = 0
EXIT_FAILED = 1  # the test ran, but not every byte arrived verified (or a transfer failed)
EXIT_USAGE = 2  # bad options (argparse uses 2 as well)
EXIT_UNREACHABLE = 3  # no kvwire-bench server there, wrong version, refused, authentication failed


class BenchError(KvwireError):
    """Base of the bench's errors; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_FAILED


class UsageError(BenchError):
    """The options do not make sense together."""

    exit_code = EXIT_USAGE


class PeerError(BenchError):
    """The peer is not a kvwire-bench peer, speaks another version, refused us or went silent."""

    exit_code = EXIT_UNREACHABLE


class PeerAuthFailed(PeerError):
    """The peer failed the handshake's authentication: its pre-shared key (``--key``) differs (or its hello
    names another handshake version: kvwire's Receiver counts both as authentication failures)."""


class BadMessage(PeerError):
    """The peer sent a message this side cannot take: a field of the wrong type or out of range ("server sent a
    bad summary.cpu_user: ..."), or more messages than were asked for. A broken or hostile peer."""


class PeerGone(BenchError):
    """The control connection ended in the middle of a test."""
