"""Errors of the ranking service, each carrying the gRPC status it becomes at the boundary.

The request path raises these; the one server interceptor (:mod:`services.ranking.server`)
turns them into a status and message. Nothing else in the service maps errors to codes.
"""

from __future__ import annotations

import grpc


class RankingError(Exception):
    """An error that knows its gRPC status code; ``str(exc)`` is the message the client sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RankingError):
    """A malformed request. ``field`` names the offending request field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class Overloaded(RankingError):
    """The server sheds this request (queue full) rather than let every request miss its deadline."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExpired(RankingError):
    """The request's deadline passed before any work started; it was dropped, not computed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NoModel(RankingError):
    """No model version is loaded yet (or none in the models folder is valid)."""

    code = grpc.StatusCode.UNAVAILABLE


class ShuttingDown(RankingError):
    """The server is stopping and takes no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(RankingError):
    code = grpc.StatusCode.UNAUTHENTICATED
