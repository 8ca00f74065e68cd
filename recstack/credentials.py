"""Secrets from the environment or files, and the Redis credentials every Redis client shares.

A password may be given three ways: inside the ``--redis`` URL (``redis://user:pass@host:port/db``),
in ``RECSTACK_REDIS_PASSWORD`` (the ``--redis-password`` flag's variable) or in a file
(``--redis-password-file``, the way Kubernetes mounts a Secret). :func:`resolve_redis_url` folds
the last two into the URL once, at start-up, so the stream consumer, the ranking fast path and
Feast all read the same URL. Anything that logs a URL logs :func:`redact_url` of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import quote

from recstack.errors import UserError
from recstack.flags import add_flag
from recstack.redis_url import connect, parse, redact

REDIS_PASSWORD_SETTINGS = "the password in --redis, RECSTACK_REDIS_PASSWORD or --redis-password-file"
# Error replies of a Redis server that refuses the credentials (or wants some).
_AUTH_REPLIES = ("WRONGPASS", "NOAUTH", "invalid password", "invalid username-password")


def read_secret_file(path: str | Path, flag: str) -> str:
    """The secret in ``path`` without its trailing newline; a clear error naming ``flag`` otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path}: cannot read it ({type(exc).__name__})") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise UserError(f"{flag} {path}: the file is empty")
    return secret


def redact_url(url: str) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``, and a ``?password=``
    hidden too (for logs and errors): :func:`recstack.redis_url.redact`."""
    return redact(url)


def add_redis_auth_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--redis-password`` (its variable ``RECSTACK_REDIS_PASSWORD`` is the way to use it) and
    ``--redis-password-file``."""
    add_flag(
        parser,
        "--redis-password",
        secret=True,
        metavar="PASSWORD",
        help="Redis password (AUTH); set it in the environment or a file, not on the command line, "
        "where other users see it in ps",
    )
    add_flag(
        parser,
        "--redis-password-file",
        metavar="PATH",
        help="file holding the Redis password (a mounted Secret); its trailing newline is ignored",
    )


def resolve_redis_url(url: str, password: str | None, password_file: str | None) -> str:
    """``url`` with the password from ``--redis-password``/``RECSTACK_REDIS_PASSWORD`` or
    ``--redis-password-file`` in it; a clear error when the password is given twice."""
    if password is not None and password_file:
        raise UserError(
            "give the Redis password once: --redis-password (RECSTACK_REDIS_PASSWORD) "
            "or --redis-password-file"
        )
    if password_file:
        password = read_secret_file(password_file, "--redis-password-file")
    if password is None:
        return url
    if not password:
        raise UserError("--redis-password (RECSTACK_REDIS_PASSWORD) is empty")
    if parse(url).password is not None:
        raise UserError(
            f"--redis {redact_url(url)} already holds a password; give it once "
            "(in the URL, RECSTACK_REDIS_PASSWORD or --redis-password-file)"
        )
    # Into the user info, the rest of the URL as it was given (the parser reads either place).
    scheme, _, rest = url.partition("://")
    authority_end = rest.find("/", rest.rfind("@") + 1)
    query_start = rest.find("?")
    ends = [i for i in (authority_end, query_start) if i >= 0]
    netloc, tail = (rest[: min(ends)], rest[min(ends) :]) if ends else (rest, "")
    userinfo, at, hosts = netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    return f"{scheme}://{user}:{quote(password, safe='')}@{hosts}{tail}"


def resolve_redis_args(args: argparse.Namespace, url_attr: str = "redis") -> str:
    """The ``--redis`` URL of parsed arguments with the password flags folded in."""
    return resolve_redis_url(
        getattr(args, url_attr),
        getattr(args, "redis_password", None),
        getattr(args, "redis_password_file", None),
    )


def is_auth_error(exc: BaseException) -> bool:
    """Whether a Redis error means the server refused (or wants) credentials."""
    import redis

    if isinstance(exc, redis.AuthenticationError):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_AUTH_REPLIES)


def redis_auth_error(url: str, exc: BaseException) -> UserError:
    """The error a person sees when Redis refuses the credentials: which server, which settings."""
    reason = str(exc).split("\n")[0][:200]
    return UserError(
        f"Redis at {redact_url(url)} refused the credentials ({reason}); check {REDIS_PASSWORD_SETTINGS}"
    )


def check_redis_auth(url: str, timeout_s: float = 5.0) -> None:
    """Connect and PING once: raise :func:`redis_auth_error` when the credentials are refused.

    A server that cannot be reached is not an error here (the services wait for it or serve
    degraded); a wrong password never fixes itself, so it stops the start-up with a clear reason.
    """
    import redis

    parsed = parse(url)
    if parsed.cluster:
        return  # its own client reports refused credentials when it connects
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # redis-py retries a refused AUTH with backoff (~4 s): a refusal is final, so ask once.
    client = connect(
        parsed, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        if is_auth_error(exc):
            raise redis_auth_error(url, exc) from None
    finally:
        client.close()
