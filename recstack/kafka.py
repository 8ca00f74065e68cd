"""How every Kafka client of the project connects: plaintext, TLS, SASL (PLAIN or SCRAM).

One option group, added to each command that talks to Kafka (``stream``, its dead-letter
producer, ``replay``, ``loadtest``'s event producer) with :func:`add_kafka_security_flags`;
one typed object, :class:`KafkaSecurity`, checked at start-up; one mapping onto the options of
kafka-python's clients, :meth:`KafkaSecurity.client_options`. Passwords come from the
environment or files and never appear in a log line, ``--help`` or an error.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recstack.credentials import read_secret_file
from recstack.errors import UserError
from recstack.flags import add_flag, env_name

SECURITY_PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# (flag, field) of every option the group adds: the subprocess hand-over below uses the same list.
_FLAGS: tuple[tuple[str, str], ...] = (
    ("--kafka-security-protocol", "protocol"),
    ("--kafka-sasl-mechanism", "sasl_mechanism"),
    ("--kafka-sasl-username", "sasl_username"),
    ("--kafka-sasl-password", "sasl_password"),
    ("--kafka-ssl-cafile", "ssl_cafile"),
    ("--kafka-ssl-certfile", "ssl_certfile"),
    ("--kafka-ssl-keyfile", "ssl_keyfile"),
)


@dataclass(frozen=True)
class KafkaSecurity:
    """The security settings of a Kafka client. The default is the local broker's PLAINTEXT."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)  # never in a log line
    ssl_cafile: str | None = None  # CA bundle that signed the broker's certificate (else the system's)
    ssl_certfile: str | None = None  # client certificate, for brokers that require mutual TLS
    ssl_keyfile: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.protocol not in SECURITY_PROTOCOLS:
            problems.append(
                f"--kafka-security-protocol must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                f"got {self.protocol!r}"
            )
        sasl = self.protocol.startswith("SASL_")
        tls = self.protocol in ("SSL", "SASL_SSL")
        if sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                problems.append(
                    f"--kafka-sasl-mechanism must be one of {', '.join(SASL_MECHANISMS)} with "
                    f"{self.protocol}, got {self.sasl_mechanism!r}"
                )
            if not self.sasl_username:
                problems.append(f"--kafka-sasl-username is required with {self.protocol}")
            if not self.sasl_password:
                problems.append(
                    f"--kafka-sasl-password (RECSTACK_KAFKA_SASL_PASSWORD) or --kafka-sasl-password-file "
                    f"is required with {self.protocol}"
                )
        else:
            given = [
                flag
                for flag, name in _FLAGS
                if name.startswith("sasl_") and getattr(self, name) not in (None, "")
            ]
            if given:
                problems.append(
                    f"{', '.join(given)} need --kafka-security-protocol SASL_PLAINTEXT or SASL_SSL, "
                    f"got {self.protocol}"
                )
        for flag, name in _FLAGS:
            if not name.startswith("ssl_"):
                continue
            path = getattr(self, name)
            if path is None or path == "":
                continue
            if not tls:
                problems.append(
                    f"{flag} needs --kafka-security-protocol SSL or SASL_SSL, got {self.protocol}"
                )
            elif not Path(path).is_file():
                problems.append(f"{flag} {path} is not a file")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            problems.append("--kafka-ssl-certfile and --kafka-ssl-keyfile go together (mutual TLS)")
        if problems:
            raise UserError("invalid Kafka security settings: " + "; ".join(problems))

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's consumer, producer and admin clients."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol.startswith("SASL_"):
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.protocol in ("SSL", "SASL_SSL"):
            options.update(
                ssl_cafile=self.ssl_cafile or None,
                ssl_certfile=self.ssl_certfile or None,
                ssl_keyfile=self.ssl_keyfile or None,
            )
        return options

    def describe(self) -> str:
        """For a log line: the protocol and user, never the password."""
        if self.protocol.startswith("SASL_"):
            return f"{self.protocol} {self.sasl_mechanism} as {self.sasl_username}"
        return self.protocol

    def environment(self) -> dict[str, str]:
        """The ``RECSTACK_KAFKA_*`` variables that give a child process these settings (secrets
        travel in its environment, never on its command line)."""
        return {env_name(flag): str(getattr(self, name)) for flag, name in _FLAGS if getattr(self, name)}


def add_kafka_security_flags(parser: argparse.ArgumentParser) -> None:
    """The ``Kafka security`` option group of a command (each flag also reads ``RECSTACK_<FLAG>``)."""
    group = parser.add_argument_group(
        "Kafka security",
        "TLS and SASL towards the brokers. Keep the password off the command line: set "
        "RECSTACK_KAFKA_SASL_PASSWORD or give --kafka-sasl-password-file.",
    )
    add_flag(
        group,
        "--kafka-security-protocol",
        default="PLAINTEXT",
        choices=list(SECURITY_PROTOCOLS),
        metavar="|".join(SECURITY_PROTOCOLS),
        help="how to reach the brokers",
    )
    add_flag(
        group,
        "--kafka-sasl-mechanism",
        choices=list(SASL_MECHANISMS),
        metavar="|".join(SASL_MECHANISMS),
        help="SASL mechanism (with SASL_PLAINTEXT or SASL_SSL)",
    )
    add_flag(group, "--kafka-sasl-username", metavar="NAME", help="SASL user name")
    add_flag(group, "--kafka-sasl-password", secret=True, metavar="PASSWORD", help="SASL password")
    add_flag(
        group,
        "--kafka-sasl-password-file",
        metavar="PATH",
        help="file holding the SASL password (a mounted Secret); its trailing newline is ignored",
    )
    add_flag(
        group,
        "--kafka-ssl-cafile",
        metavar="PEM",
        help="CA certificates that signed the brokers' certificates",
    )
    add_flag(group, "--kafka-ssl-certfile", metavar="PEM", help="client certificate (mutual TLS)")
    add_flag(group, "--kafka-ssl-keyfile", metavar="PEM", help="client private key (mutual TLS)")


def kafka_security_from_args(args: argparse.Namespace) -> KafkaSecurity:
    """The checked settings from parsed arguments; the password file is read here."""
    password = args.kafka_sasl_password
    if args.kafka_sasl_password_file:
        if password is not None:
            raise UserError(
                "give the Kafka SASL password once: --kafka-sasl-password (RECSTACK_KAFKA_SASL_PASSWORD) "
                "or --kafka-sasl-password-file"
            )
        password = read_secret_file(args.kafka_sasl_password_file, "--kafka-sasl-password-file")
    return KafkaSecurity(
        protocol=args.kafka_security_protocol,
        sasl_mechanism=args.kafka_sasl_mechanism,
        sasl_username=args.kafka_sasl_username,
        sasl_password=password,
        ssl_cafile=args.kafka_ssl_cafile,
        ssl_certfile=args.kafka_ssl_certfile,
        ssl_keyfile=args.kafka_ssl_keyfile,
    )


def kafka_security_from_env() -> KafkaSecurity:
    """The settings from ``RECSTACK_KAFKA_*`` alone: for processes without our command line
    (the Locust workers a ``recstack loadtest`` starts)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_kafka_security_flags(parser)
    args, _ = parser.parse_known_args([])
    return kafka_security_from_args(args)
