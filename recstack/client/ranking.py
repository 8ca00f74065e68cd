"""Typed ``Rank`` / ``Recommend`` calls with a default deadline, retries and an optional fallback.

:class:`RankingClient` (blocking) and :class:`AsyncRankingClient` (asyncio) share everything but
the call itself. A failed call either raises :class:`RankingError` or, when the client has a
``fallback``, returns the fallback's answer marked ``fallback=True`` with the error attached.
Strict mode (``strict=True``) has neither retries nor a fallback: every error reaches the caller,
which is what the chaos run and the benchmarks count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from recstack.client.channel import DEFAULT_RETRY, RetryPolicy, make_aio_channel, make_channel
from recstack.v1 import ranking_pb2, ranking_pb2_grpc

DEFAULT_DEADLINE_S = 1.0
# Errors that say the request itself is wrong or not allowed: a fallback would hide a bug or a
# misconfiguration, so these always raise.
_CALLER_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


class RankingError(RuntimeError):
    """A ``Rank`` or ``Recommend`` call that failed; ``code`` is the gRPC status code."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"{method} failed: {code.name}: {details}")


@dataclass(frozen=True, slots=True)
class RankedItem:
    item_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Ranking:
    """An answer, best first. ``path`` is the server's compute path ("light", "full", "cascade"
    or "fallback"); ``degraded`` is the server's own flag (a dependency failed and it answered
    anyway). ``fallback`` means the call failed and the client's fallback answered: ``error``
    is why, ``model_version`` and ``path`` are empty and scores are 0. ``request_id`` names this
    answer (send it back with the events the shopper's actions cause, so they are attributed to
    it); ``arm`` is the experiment arm that answered ("" without an experiment, or from a server
    that predates experiments)."""

    items: tuple[RankedItem, ...]
    model_version: str
    path: str
    degraded: bool
    fallback: bool = False
    error: RankingError | None = None
    request_id: str = ""
    arm: str = ""

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self.items]

    @classmethod
    def from_proto(cls, reply: ranking_pb2.RankResponse) -> Ranking:
        return cls(
            items=tuple(RankedItem(i.item_id, i.score) for i in reply.items),
            model_version=reply.model_version,
            path=reply.path,
            degraded=reply.degraded,
            request_id=reply.request_id,
            arm=reply.arm,
        )


@dataclass(frozen=True, slots=True)
class FailedCall:
    """What a fallback is given: the call that failed and why."""

    method: str  # "Rank" or "Recommend"
    user_id: str
    item_ids: tuple[str, ...]  # Rank's candidates (empty for Recommend)
    k: int  # Rank's top_k or Recommend's k (0: all)
    error: RankingError


Fallback = Callable[[FailedCall], Sequence[str]]


def in_request_order(call: FailedCall) -> list[str]:
    """A fallback: Rank's candidates in the order the caller gave them (Recommend: nothing)."""
    items = list(call.item_ids)
    return items[: call.k] if call.k > 0 else items


class _Base:
    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
        retries: RetryPolicy | None = DEFAULT_RETRY,
        fallback: Fallback | None = None,
        strict: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if strict and fallback is not None:
            raise ValueError("strict mode has no fallback: every error reaches the caller")
        self.deadline_s = deadline_s
        self.fallback = fallback
        self.strict = strict
        self._channel_args = dict(
            tls=tls,
            root_certificates=root_certificates,
            tls_server_name=tls_server_name,
            token=token,
            retries=None if strict else retries,
            options=options,
        )

    @staticmethod
    def _rank_request(user_id: str, item_ids: Sequence[str], top_k: int) -> ranking_pb2.RankRequest:
        return ranking_pb2.RankRequest(user_id=user_id, item_ids=list(item_ids), top_k=top_k)

    @staticmethod
    def _recommend_request(user_id: str, k: int, include_purchased: bool) -> ranking_pb2.RecommendRequest:
        return ranking_pb2.RecommendRequest(user_id=user_id, k=k, include_purchased=include_purchased)

    def _failed(self, exc: grpc.RpcError, call: tuple[str, str, Sequence[str], int]) -> Ranking:
        """The fallback's answer for a failed call, or the error raised."""
        method, user_id, item_ids, k = call
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
        error = RankingError(method, code, details)
        if self.fallback is None or code in _CALLER_ERRORS:
            raise error from exc
        failed = FailedCall(method, user_id, tuple(item_ids), k, error)
        items = tuple(RankedItem(item_id, 0.0) for item_id in self.fallback(failed))
        return Ranking(items, model_version="", path="", degraded=True, fallback=True, error=error)

    def _timeout(self, deadline_s: float | None) -> float:
        return self.deadline_s if deadline_s is None else deadline_s


class RankingClient(_Base):
    """Blocking client; use it as a context manager or call :meth:`close`.

    ``RankingClient("127.0.0.1:50051", token=..., fallback=in_request_order).rank(user, items)``
    """

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.channel = make_channel(target, **self._channel_args)
        self._stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def rank(
        self, user_id: str, item_ids: Sequence[str], top_k: int = 0, *, deadline_s: float | None = None
    ) -> Ranking:
        """``item_ids`` ordered best first for ``user_id`` (the first ``top_k``; 0: all)."""
        request = self._rank_request(user_id, item_ids, top_k)
        try:
            return Ranking.from_proto(self._stub.Rank(request, timeout=self._timeout(deadline_s)))
        except grpc.RpcError as exc:
            return self._failed(exc, ("Rank", user_id, item_ids, top_k))

    def recommend(
        self, user_id: str, k: int = 10, *, include_purchased: bool = False, deadline_s: float | None = None
    ) -> Ranking:
        """``k`` items the server generates and ranks for ``user_id``."""
        request = self._recommend_request(user_id, k, include_purchased)
        try:
            return Ranking.from_proto(self._stub.Recommend(request, timeout=self._timeout(deadline_s)))
        except grpc.RpcError as exc:
            return self._failed(exc, ("Recommend", user_id, (), k))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRankingClient(_Base):
    """asyncio client (``grpc.aio``); create it inside the event loop that uses it."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.channel = make_aio_channel(target, **self._channel_args)
        self._stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    async def rank(
        self, user_id: str, item_ids: Sequence[str], top_k: int = 0, *, deadline_s: float | None = None
    ) -> Ranking:
        request = self._rank_request(user_id, item_ids, top_k)
        try:
            return Ranking.from_proto(await self._stub.Rank(request, timeout=self._timeout(deadline_s)))
        except grpc.RpcError as exc:
            return self._failed(exc, ("Rank", user_id, item_ids, top_k))

    async def recommend(
        self, user_id: str, k: int = 10, *, include_purchased: bool = False, deadline_s: float | None = None
    ) -> Ranking:
        request = self._recommend_request(user_id, k, include_purchased)
        try:
            reply = await self._stub.Recommend(request, timeout=self._timeout(deadline_s))
            return Ranking.from_proto(reply)
        except grpc.RpcError as exc:
            return self._failed(exc, ("Recommend", user_id, (), k))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncRankingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
