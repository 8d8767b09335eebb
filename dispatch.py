#!/usr/bin/env python3
"""Dispatch: an authenticated ESMTP relay that batches mail to one upstream.

Many apps send mail to Dispatch with one set of credentials; Dispatch queues
it and, every DISPATCH_INTERVAL seconds, forwards the whole queue in one batch
to the upstream provider with the provider's credentials.

The file reads in the order mail flows through it:

    1. configuration            (environment variables -> Config)
    2. the client session       (ESMTP state machine -> Session)
    3. the queue and its spool  (Message, Queue, Spool)
    4. delivery to the upstream (Upstream, Flusher)
    5. health and metrics       (Metrics, the /healthz and /metrics listener)
    6. the server's life cycle  (Relay: start, signals, drain)
    7. command line             (main)

Standard library plus bcrypt, nothing else.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import dataclasses
import getpass
import hashlib
import hmac
import http.server
import itertools
import json
import logging
import logging.handlers
import math
import os
import queue as queue_module
import re
import signal
import smtplib
import socket
import socketserver
import ssl
import sys
import threading
import time
from typing import Callable, Iterable, Mapping, Optional

import bcrypt

__version__ = "1.0"

log = logging.getLogger("dispatch")


# ===========================================================================
# 1. Configuration
# ===========================================================================


class ConfigError(Exception):
    """A bad configuration value: one line that names the variable."""


def _text(env: Mapping[str, str], name: str, default: Optional[str] = None,
          required: bool = False) -> Optional[str]:
    value = env.get(name, "").strip()
    if value:
        return value
    if required:
        raise ConfigError(f"{name}: required but not set")
    return default


def _number(env: Mapping[str, str], name: str, default: float, kind: type = int,
            minimum: float = 0, maximum: Optional[float] = None) -> float:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}: {raw!r} is not {noun}") from None
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name}: {raw!r} is out of range ({bounds})")
    return value


def _port(env: Mapping[str, str], name: str, default: Optional[int]) -> Optional[int]:
    if _text(env, name) is None:
        return default
    return int(_number(env, name, 0, int, 1, 65535))


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _text(env, name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: {raw!r} is not 1 or 0")


def _readable_file(env: Mapping[str, str], name: str) -> Optional[str]:
    path = _text(env, name)
    if path is None:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    return path


BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of the relay, read from the environment (SPEC section 1)."""

    # No defaults here: from_env is the one place that knows them.
    username: str
    password_hash: bytes
    upstream_host: str
    interval: float
    relay_host: str
    bind: str
    port: int
    upstream_port: int
    upstream_user: Optional[str]
    upstream_pass: Optional[str]
    upstream_from: Optional[str]
    upstream_replyto: Optional[str]
    upstream_tls: str
    upstream_tls_verify: bool
    upstream_ca_file: Optional[str]
    tls_cert: Optional[str]
    tls_key: Optional[str]
    require_tls: bool
    tls_port: Optional[int]
    max_size: int
    max_recipients: int
    timeout: float
    max_connections: int
    spool: Optional[str]
    max_queue: int
    max_age: float
    retry_max: float
    drain_timeout: float
    metrics_port: Optional[int]
    metrics_bind: str
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Config":
        """Read and check every variable; raise ConfigError on the first bad one."""
        username = _text(env, "RELAY_USERNAME", required=True)
        password_hash = _text(env, "RELAY_PASSWORD", required=True)
        if not BCRYPT_HASH.match(password_hash):
            raise ConfigError("RELAY_PASSWORD: not a bcrypt hash ($2a$, $2b$ or $2y$); "
                              "make one with: python dispatch.py hash-password")
        upstream_port = _port(env, "UPSTREAM_PORT", 587)
        upstream_tls = (_text(env, "UPSTREAM_TLS") or
                        ("tls" if upstream_port == 465 else "starttls")).lower()
        if upstream_tls not in ("starttls", "tls", "none"):
            raise ConfigError(f"UPSTREAM_TLS: {upstream_tls!r} is not starttls, tls or none")
        upstream_user = _text(env, "UPSTREAM_USER")
        upstream_pass = env.get("UPSTREAM_PASS") or None
        if bool(upstream_user) != bool(upstream_pass):
            raise ConfigError("UPSTREAM_PASS: UPSTREAM_USER and UPSTREAM_PASS go together; "
                              "set both or neither")
        tls_cert = _readable_file(env, "RELAY_TLS_CERT")
        tls_key = _readable_file(env, "RELAY_TLS_KEY")
        if bool(tls_cert) != bool(tls_key):
            raise ConfigError("RELAY_TLS_KEY: RELAY_TLS_CERT and RELAY_TLS_KEY go together; "
                              "set both or neither")
        require_tls = _flag(env, "RELAY_REQUIRE_TLS", bool(tls_cert))
        if require_tls and not tls_cert:
            raise ConfigError("RELAY_REQUIRE_TLS: is 1 but RELAY_TLS_CERT is not set")
        tls_port = _port(env, "RELAY_TLS_PORT", None)
        if tls_port and not tls_cert:
            raise ConfigError("RELAY_TLS_PORT: needs RELAY_TLS_CERT and RELAY_TLS_KEY")
        bind = _text(env, "RELAY_BIND", "0.0.0.0")
        log_level = (_text(env, "LOG_LEVEL") or "INFO").upper()
        if log_level not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        return cls(
            username=username,
            password_hash=password_hash.encode("ascii"),
            upstream_host=_text(env, "UPSTREAM_HOST", required=True),
            interval=_number(env, "DISPATCH_INTERVAL", 60.0, float),
            relay_host=_text(env, "RELAY_HOST") or socket.getfqdn(),
            bind=bind,
            port=_port(env, "RELAY_PORT", 25),
            upstream_port=upstream_port,
            upstream_user=upstream_user,
            upstream_pass=upstream_pass,
            upstream_from=_text(env, "UPSTREAM_FROM"),
            upstream_replyto=_text(env, "UPSTREAM_REPLYTO"),
            upstream_tls=upstream_tls,
            upstream_tls_verify=_flag(env, "UPSTREAM_TLS_VERIFY", True),
            upstream_ca_file=_readable_file(env, "UPSTREAM_CA_FILE"),
            tls_cert=tls_cert,
            tls_key=tls_key,
            require_tls=require_tls,
            tls_port=tls_port,
            max_size=int(_number(env, "RELAY_MAX_SIZE", 10485760, int, 1)),
            max_recipients=int(_number(env, "RELAY_MAX_RECIPIENTS", 100, int, 1)),
            timeout=_number(env, "RELAY_TIMEOUT", 300.0, float, 0.001),
            max_connections=int(_number(env, "RELAY_MAX_CONNECTIONS", 100, int, 1)),
            spool=_text(env, "DISPATCH_SPOOL"),
            max_queue=int(_number(env, "DISPATCH_MAX_QUEUE", 268435456, int, 1)),
            max_age=_number(env, "DISPATCH_MAX_AGE", 432000.0, float, 1),
            retry_max=_number(env, "DISPATCH_RETRY_MAX", 3600.0, float, 1),
            drain_timeout=_number(env, "DISPATCH_DRAIN_TIMEOUT", 30.0, float, 0),
            metrics_port=_port(env, "DISPATCH_METRICS_PORT", None),
            metrics_bind=_text(env, "DISPATCH_METRICS_BIND", bind),
            log_level=log_level,
        )

    def server_tls_context(self) -> Optional[ssl.SSLContext]:
        """The listener's TLS context, or None; a bad certificate is a ConfigError."""
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The drain wakes a session by shutting its socket's read side; OpenSSL 3
        # takes that EOF as fatal, and the 421 could no longer be sent inside TLS.
        # SMTP ends its own data (CRLF.CRLF), so an EOF never completes a message.
        context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
        # OpenSSL's own errors ("PEM lib") name neither file: say which one is wrong.
        for name, path, marker, what in (
                ("RELAY_TLS_CERT", self.tls_cert, b"-----BEGIN CERTIFICATE-----", "certificate"),
                ("RELAY_TLS_KEY", self.tls_key, b"PRIVATE KEY-----", "private key")):
            try:
                with open(path, "rb") as handle:
                    if marker not in handle.read():
                        raise ConfigError(f"{name}: {path} holds no PEM {what}")
            except OSError as exc:
                raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None

        def no_passphrase() -> bytes:
            # Without a callback OpenSSL prompts on the terminal and waits there.
            raise ConfigError(f"RELAY_TLS_KEY: {self.tls_key} is encrypted; "
                              "give Dispatch the key without a passphrase")

        try:
            context.load_cert_chain(self.tls_cert, self.tls_key, password=no_passphrase)
        except (ssl.SSLError, OSError) as exc:
            if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                raise ConfigError(f"RELAY_TLS_KEY: {self.tls_key} does not match the "
                                  f"certificate in {self.tls_cert}") from None
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            # "[SSL] PEM lib (_ssl.c:3905)": keep what means something to an operator.
            reason = re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", reason)
            raise ConfigError(f"RELAY_TLS_CERT: cannot load {self.tls_cert} with key "
                              f"{self.tls_key}: {reason}") from None
        return context

    def upstream_tls_context(self) -> ssl.SSLContext:
        """The context used to check the upstream's certificate."""
        try:
            context = ssl.create_default_context(cafile=self.upstream_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"UPSTREAM_CA_FILE: cannot load {self.upstream_ca_file}: "
                              f"{getattr(exc, 'reason', None) or exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.upstream_tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


# ===========================================================================
# 2. The client session (the ESMTP state machine)
# ===========================================================================

# Each reply with its enhanced status code (RFC 3463), so that one reply means
# the same thing wherever it is sent.
R_OK = "250 2.0.0 Ok"
R_SENDER_OK = "250 2.1.0 Ok"
R_RCPT_OK = "250 2.1.5 Ok"
R_QUEUED = "250 2.0.0 Ok: queued as {}"
R_BYE = "221 2.0.0 Bye"
R_HELP = "214 2.0.0 Commands: EHLO HELO AUTH STARTTLS MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
R_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message"
R_AUTH_OK = "235 2.7.0 Authentication successful"
R_DATA = "354 End data with <CR><LF>.<CR><LF>"
R_TLS_GO = "220 2.0.0 Ready to start TLS"
R_TOO_MANY_CONNECTIONS = "421 4.7.0 {} Too many connections, try again later"
R_TIMEOUT = "421 4.4.2 {} Timeout, closing connection"
R_SHUTDOWN = "421 4.3.2 {} Service shutting down, try again later"
R_AUTH_LOCKOUT = "421 4.7.0 {} Too many failed authentications, closing connection"
R_QUEUE_FULL = "452 4.3.1 Insufficient system storage"
R_LOCAL_ERROR = "451 4.3.0 Local error in processing, try again later"
R_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
R_UNKNOWN = "500 5.5.2 Error: command not recognized"
R_LINE_TOO_LONG = "500 5.5.2 Error: line too long"
R_SYNTAX = "501 5.5.4 Syntax: {}"
R_AUTH_CANCELLED = "501 5.7.0 Authentication cancelled"
R_BAD_BASE64 = "501 5.5.2 Cannot decode response"
R_BAD_SEQUENCE = "503 5.5.1 Error: {}"
R_BAD_MECHANISM = "504 5.5.4 Unrecognized authentication type"
R_AUTH_REQUIRED = "530 5.7.0 Authentication required"
R_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
R_TLS_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
R_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
R_BAD_PARAMETER = "555 5.5.4 Unsupported parameter: {}"

def encode_reply(text: str) -> bytes:
    return text.encode("utf-8", "replace") + b"\r\n"


MAX_COMMAND_LINE = 512        # RFC 5321 4.5.3.1.4, CRLF included
MAX_AUTH_LINE = 12288 + 2     # RFC 4954 4: an AUTH line or SASL response
MAX_AUTH_FAILURES = 3
RECV_SIZE = 65536             # below glibc's mmap threshold, reused per session

# A path is <...> with no spaces, brackets or control characters inside;
# quoted local parts with spaces are not worth their parsing risk here.
PATH = re.compile(r"^<([^<>\s\x00-\x1f\x7f]*)>$")
MAILBOX = re.compile(r"^[^@]+@[^@]+$")


def parse_path(argument: str, keyword: str, allow_null: bool) -> tuple[str, dict[str, str]]:
    """Parse 'FROM:<addr> PARAM=value ...'; return (address, {PARAM: value}).

    Raises ValueError when the argument is malformed.
    """
    head, sep, rest = argument.partition(":")
    if not sep or head.strip().upper() != keyword:
        raise ValueError
    words = rest.strip().split()
    if not words:
        raise ValueError
    match = PATH.match(words[0])
    if not match:
        raise ValueError
    address = match.group(1)
    if address.startswith("@") and ":" in address:
        address = address.split(":", 1)[1]  # drop an RFC 5321 source route
    if address == "":
        if not allow_null:
            raise ValueError
    elif not MAILBOX.match(address) and address.lower() != "postmaster":
        raise ValueError
    params = {}
    for word in words[1:]:
        name, _, value = word.partition("=")
        params[name.upper()] = value
    return address, params


class _AuthCancelled(Exception):
    """The client answered a SASL challenge with '*'."""


class _LineTooLong(Exception):
    """A SASL response longer than RFC 4954 allows."""


BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def unstuff(raw: bytes) -> bytes:
    """Remove the transparency dot of RFC 5321 4.5.2 from every CRLF line."""
    if raw[:1] == b".":
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n")


def normalise(data: bytes) -> bytes:
    """Store a bare CR or LF as CRLF, so no laxer upstream sees a smuggled line."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
        return data
    return BARE_LINE_END.sub(b"\r\n", data)


class SessionClosed(Exception):
    """The client went away, timed out, or the session must end now."""


class Session(socketserver.BaseRequestHandler):
    """One client connection: read commands, answer them, accept mail.

    Commands are dispatched to `smtp_<VERB>` methods.  Replies are collected
    and written in one send whenever the session is about to wait for the
    client, so a pipelined burst of commands costs one write.
    """

    server: "Listener"

    # -- connection plumbing ----------------------------------------------

    def setup(self) -> None:
        self.relay: Relay = self.server.relay
        self.config: Config = self.relay.config
        self.sock: socket.socket = self.request
        self.peer = "%s:%s" % self.client_address[:2]
        self.buffer = bytearray()
        self.chunk = bytearray(RECV_SIZE)
        self.pending: list[bytes] = []
        self.in_data = False           # guarded by relay.sessions_lock
        self.tls_on = self.server.implicit_tls
        self.greeted: Optional[str] = None
        self.authenticated = False
        self.auth_failures = 0
        self.reset_transaction()

    def finish(self) -> None:
        # socketserver closes the socket it accepted; after a TLS handshake the
        # session talks through a wrapper that owns the connection instead.
        if self.sock is not self.request:
            try:   # send TLS close_notify (RFC 8446 6.1), without waiting for the client's
                self.sock.setblocking(False)
                self.sock.unwrap()
            except (OSError, ValueError):
                pass
            self.sock.close()

    def reset_transaction(self) -> None:
        self.sender: Optional[str] = None
        self.recipients: list[str] = []
        self.smtputf8 = False
        self.body_8bit = False

    def reply(self, text: str) -> None:
        self.pending.append(encode_reply(text))

    def flush_replies(self) -> None:
        if self.pending:
            data = b"".join(self.pending)
            self.pending.clear()
            try:
                self.sock.sendall(data)
            except OSError as exc:
                raise SessionClosed(f"send failed: {exc}") from None

    def fill(self) -> None:
        """Wait for more bytes from the client (after sending what is pending)."""
        self.flush_replies()
        try:
            n = self.sock.recv_into(self.chunk)
        except socket.timeout:
            self.reply(R_TIMEOUT.format(self.config.relay_host))
            self.flush_replies()
            raise SessionClosed("timeout") from None
        except (OSError, ssl.SSLError) as exc:
            raise SessionClosed(f"receive failed: {exc}") from None
        if not n:
            raise SessionClosed("client closed the connection")
        self.buffer += memoryview(self.chunk)[:n]

    def read_line(self, limit: int) -> Optional[bytes]:
        """The next line, CRLF stripped; None when it was longer than `limit`."""
        too_long = False
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                if too_long or len(line) > limit:
                    return None
                return line.rstrip(b"\r\n")
            if len(self.buffer) > limit:
                too_long = True        # discard, but keep reading to its end
                del self.buffer[:]
            start = len(self.buffer)
            self.fill()

    # -- the command loop -------------------------------------------------

    def handle(self) -> None:
        self.relay.session_opened(self)
        try:
            self.sock.settimeout(self.config.timeout)
            if self.tls_on:
                self.start_tls()
            self.reply(f"220 {self.config.relay_host} ESMTP")
            while True:
                if self.relay.draining:
                    self.reply(R_SHUTDOWN.format(self.config.relay_host))
                    break
                line = self.read_line(MAX_AUTH_LINE)
                if line is None:
                    self.reply(R_LINE_TOO_LONG)
                    continue
                if not self.dispatch_command(line):
                    break
            self.flush_replies()
        except SessionClosed as exc:
            log.debug("session %s ended: %s", self.peer, exc)
            if self.relay.draining:
                self.reply(R_SHUTDOWN.format(self.config.relay_host))
                try:
                    self.flush_replies()
                except SessionClosed:
                    pass
        finally:
            self.relay.session_closed(self)

    def dispatch_command(self, line: bytes) -> bool:
        """Run one command line; False ends the session."""
        verb, _, argument = line.partition(b" ")
        name = verb.decode("ascii", "replace").upper()
        if len(line) + 2 > MAX_COMMAND_LINE and name != "AUTH":
            self.reply(R_LINE_TOO_LONG)
            return True
        method: Optional[Callable[[str], Optional[bool]]] = (
            getattr(self, "smtp_" + name, None) if name.isalpha() else None)
        if method is None:
            self.reply(R_UNKNOWN)
            return True
        try:
            text = argument.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.reply(R_SYNTAX.format("arguments must be UTF-8"))
            return True
        return method(text) is not False

    # -- commands ---------------------------------------------------------

    def smtp_EHLO(self, argument: str) -> None:
        if not argument:
            self.reply(R_SYNTAX.format("EHLO hostname"))
            return
        self.greeted = argument
        self.reset_transaction()
        lines = [self.config.relay_host, "PIPELINING", f"SIZE {self.config.max_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_on or not self.config.require_tls:
            lines.append("AUTH PLAIN LOGIN")
        if self.relay.tls_context and not self.tls_on:
            lines.append("STARTTLS")
        for line in lines[:-1]:
            self.reply("250-" + line)
        self.reply("250 " + lines[-1])

    def smtp_HELO(self, argument: str) -> None:
        if not argument:
            self.reply(R_SYNTAX.format("HELO hostname"))
            return
        self.greeted = argument
        self.reset_transaction()
        self.reply(f"250 {self.config.relay_host}")

    def smtp_STARTTLS(self, argument: str) -> Optional[bool]:
        if argument:
            self.reply(R_SYNTAX.format("STARTTLS"))
            return None
        if self.relay.tls_context is None:
            self.reply(R_UNKNOWN)
            return None
        if self.tls_on:
            self.reply(R_BAD_SEQUENCE.format("TLS already active"))
            return None
        if self.sender is not None:
            self.reply(R_BAD_SEQUENCE.format("STARTTLS not allowed inside a transaction"))
            return None
        self.reply(R_TLS_GO)
        self.flush_replies()
        # Whatever the client pipelined after STARTTLS arrived in cleartext:
        # executing it inside TLS is the STARTTLS command-injection flaw.
        del self.buffer[:]
        self.start_tls()
        self.greeted = None
        self.authenticated = False
        self.reset_transaction()
        return None

    def start_tls(self) -> None:
        try:
            self.sock = self.relay.tls_context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            # Logged at INFO: a client whose TLS is too old or that distrusts the
            # certificate cannot send mail, and this line is the only trace of it.
            log.info("TLS handshake failed: client=%s, %s", self.peer,
                     getattr(exc, "reason", None) or exc)
            raise SessionClosed(f"TLS handshake failed: {exc}") from None
        self.tls_on = True

    def smtp_AUTH(self, argument: str) -> Optional[bool]:
        if not self.greeted:
            self.reply(R_BAD_SEQUENCE.format("send EHLO first"))
            return None
        if self.authenticated:
            self.reply(R_BAD_SEQUENCE.format("already authenticated"))
            return None
        if self.sender is not None:
            self.reply(R_BAD_SEQUENCE.format("AUTH not allowed inside a transaction"))
            return None
        if self.config.require_tls and not self.tls_on:
            self.reply(R_TLS_REQUIRED)
            return None
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            self.reply(R_BAD_MECHANISM)
            return None
        try:
            if mechanism == "PLAIN":
                parts = self.sasl_response(initial.strip(), "").split(b"\0")
                if len(parts) != 3:
                    raise ValueError
                identity, user, password = parts
                good = identity in (b"", user) and self.relay.check_password(user, password)
            else:
                user = self.sasl_response(initial.strip(), "VXNlcm5hbWU6")
                password = self.sasl_response("", "UGFzc3dvcmQ6")
                good = self.relay.check_password(user, password)
        except _AuthCancelled:
            return self.auth_failed(R_AUTH_CANCELLED)
        except _LineTooLong:
            return self.auth_failed(R_LINE_TOO_LONG)
        except (ValueError, binascii.Error):
            return self.auth_failed(R_BAD_BASE64)
        if not good:
            return self.auth_failed(R_AUTH_FAILED)
        self.authenticated = True
        self.reply(R_AUTH_OK)
        return None

    def sasl_response(self, initial: str, challenge: str) -> bytes:
        """The client's decoded answer: the initial response, or one read after 334."""
        if not initial:
            self.reply("334 " + challenge)
            line = self.read_line(MAX_AUTH_LINE)
            if line is None:
                raise _LineTooLong
            initial = line.decode("ascii", "replace").strip()
        if initial == "*":
            raise _AuthCancelled
        if initial == "=":
            return b""
        return base64.b64decode(initial, validate=True)

    def auth_failed(self, text: str) -> Optional[bool]:
        self.auth_failures += 1
        self.relay.metrics.count("auth_failures")
        self.relay.metrics.refused("auth")
        log.warning("authentication failed: client=%s, failures=%d", self.peer, self.auth_failures)
        self.reply(text)
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self.reply(R_AUTH_LOCKOUT.format(self.config.relay_host))
            return False
        return None

    def smtp_MAIL(self, argument: str) -> None:
        if not self.authenticated:
            self.relay.metrics.refused("auth_required")
            self.reply(R_AUTH_REQUIRED)
            return
        if self.sender is not None:
            self.reply(R_BAD_SEQUENCE.format("nested MAIL command"))
            return
        try:
            address, params = parse_path(argument, "FROM", allow_null=True)
        except ValueError:
            self.reply(R_SYNTAX.format("MAIL FROM:<address>"))
            return
        smtputf8 = body_8bit = False
        for name, value in params.items():
            if name == "SIZE":
                if not (value.isascii() and value.isdigit()):
                    self.reply(R_SYNTAX.format("SIZE=<bytes>"))
                    return
                if int(value) > self.config.max_size:
                    self.relay.metrics.refused("size")
                    self.reply(R_TOO_BIG)
                    return
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self.reply(R_SYNTAX.format("BODY=7BIT|8BITMIME"))
                    return
                body_8bit = value.upper() == "8BITMIME"
            elif name == "SMTPUTF8" and not value:
                smtputf8 = True
            elif name == "AUTH" and value:
                pass  # RFC 4954 5: accepted; the relay sends its own identity upstream
            else:
                self.reply(R_BAD_PARAMETER.format(name))
                return
        if not smtputf8 and not address.isascii():
            self.reply(R_NEEDS_SMTPUTF8)
            return
        if self.relay.queue.full():
            self.relay.metrics.refused("queue_full")
            self.reply(R_QUEUE_FULL)
            return
        self.sender, self.smtputf8, self.body_8bit = address, smtputf8, body_8bit
        self.reply(R_SENDER_OK)

    def smtp_RCPT(self, argument: str) -> None:
        if self.sender is None:
            self.reply(R_BAD_SEQUENCE.format("need MAIL command"))
            return
        try:
            address, params = parse_path(argument, "TO", allow_null=False)
        except ValueError:
            self.reply(R_SYNTAX.format("RCPT TO:<address>"))
            return
        if params:
            self.reply(R_BAD_PARAMETER.format(next(iter(params))))
            return
        if not self.smtputf8 and not address.isascii():
            self.reply(R_NEEDS_SMTPUTF8)
            return
        if len(self.recipients) >= self.config.max_recipients:
            self.relay.metrics.refused("recipients")
            self.reply(R_TOO_MANY_RCPTS)
            return
        self.recipients.append(address)
        self.reply(R_RCPT_OK)

    def smtp_DATA(self, argument: str) -> None:
        if argument:
            self.reply(R_SYNTAX.format("DATA"))
            return
        if self.sender is None:
            self.reply(R_BAD_SEQUENCE.format("need MAIL command"))
            return
        if not self.recipients:
            self.reply(R_BAD_SEQUENCE.format("need RCPT command"))
            return
        # A drain waits while in_data is set: until the message is queued.
        with self.relay.sessions_lock:
            if self.relay.draining:
                raise SessionClosed("shutting down")
            self.in_data = True
        try:
            self.reply(R_DATA)
            data = self.read_data()
            if data is None:
                self.relay.metrics.refused("size")
                self.reply(R_TOO_BIG)
            else:
                self.reply(self.relay.accept(Message(
                    next_queue_id(), self.sender, self.recipients, data,
                    self.smtputf8, self.body_8bit, self.peer)))
        finally:
            with self.relay.sessions_lock:
                self.in_data = False
                self.relay.sessions_lock.notify_all()
        self.reset_transaction()

    def read_data(self) -> Optional[bytes]:
        """Read the message to CRLF.CRLF; None when it is over the size limit.

        Only CR LF . CR LF ends the data: a bare LF before the dot is data,
        so a smuggled second message stays inside the first one.
        """
        buffer = self.buffer
        limit = self.config.max_size
        scan = 0
        while True:
            # The CRLF that ended the DATA line counts: ".\r\n" first is an empty message.
            if limit >= 0 and buffer.startswith(b".\r\n"):
                end = -2
            else:
                end = buffer.find(b"\r\n.\r\n", scan)
            if end != -1:
                break
            if len(buffer) > limit * 4 // 3 + 4096:
                # Over the limit even if every line were a stuffed ".": keep
                # only enough to spot the terminator, and read on to the end.
                del buffer[:-4]
                limit = -1
            scan = max(0, len(buffer) - 4)
            self.fill()
        with memoryview(buffer) as view:
            raw = bytes(view[:end + 2])
        del buffer[:end + 5]
        if limit < 0:
            return None
        data = normalise(unstuff(raw))
        return data if len(data) <= self.config.max_size else None

    def smtp_RSET(self, argument: str) -> None:
        self.reset_transaction()
        self.reply(R_OK)

    def smtp_NOOP(self, argument: str) -> None:
        self.reply(R_OK)

    def smtp_VRFY(self, argument: str) -> None:
        self.reply(R_VRFY)

    def smtp_HELP(self, argument: str) -> None:
        self.reply(R_HELP)

    def smtp_QUIT(self, argument: str) -> bool:
        self.reply(R_BYE)
        return False


# ===========================================================================
# 3. The queue and its spool
# ===========================================================================

_ID_SEQUENCE = itertools.count()
_ID_LOCK = threading.Lock()


def next_queue_id() -> str:
    """A Postfix-like queue ID: sortable by arrival, unique across restarts."""
    with _ID_LOCK:
        sequence = next(_ID_SEQUENCE) & 0xFFF
        return "%013X%03X" % (time.time_ns() // 1000, sequence)


class Message:
    """One accepted message: its envelope, its bytes, and its delivery state."""

    __slots__ = ("id", "sender", "recipients", "data", "smtputf8", "body_8bit", "client",
                 "arrived", "attempts", "next_try", "path")

    def __init__(self, id: str, sender: str, recipients: list[str], data: bytes,
                 smtputf8: bool = False, body_8bit: bool = False, client: str = "",
                 arrived: Optional[float] = None) -> None:
        self.id = id
        self.sender = sender
        self.recipients = list(recipients)
        self.data = data
        self.smtputf8 = smtputf8
        self.body_8bit = body_8bit
        self.client = client
        self.arrived = time.time() if arrived is None else arrived
        self.attempts = 0
        self.next_try = 0.0   # time.time() before which no attempt is made
        self.path: Optional[str] = None

    def envelope(self) -> dict:
        return {"sender": self.sender, "recipients": self.recipients,
                "smtputf8": self.smtputf8, "body_8bit": self.body_8bit,
                "client": self.client, "arrived": self.arrived, "size": len(self.data)}


class Spool:
    """Accepted messages on disk: one file each, fsynced before the 250.

    A file is a first line "DISPATCH 1 <json envelope>\\n" and then the
    message bytes.  Files are written under tmp/ and renamed into place, so a
    crash leaves either the whole file or a stray file in tmp/.
    """

    MAGIC = b"DISPATCH 1 "

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.tmp = os.path.join(directory, "tmp")
        self.failed = os.path.join(directory, "failed")
        for path in (self.tmp, self.failed):
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"DISPATCH_SPOOL: cannot create {path}: {exc.strerror}") \
                    from None
        if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
            raise ConfigError(f"DISPATCH_SPOOL: {directory} is not readable and writable")

    def write(self, message: Message) -> None:
        """Write (or rewrite) the message's file and make it durable."""
        final = os.path.join(self.directory, message.id + ".msg")
        temporary = os.path.join(self.tmp, message.id + ".msg")
        header = self.MAGIC + json.dumps(message.envelope()).encode("utf-8") + b"\n"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                with os.fdopen(fd, "wb", closefd=False) as handle:
                    handle.write(header)
                    handle.write(message.data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if message.path is None:
                # A new message never replaces a file: a queue ID seen again (a
                # clock stepped back across a restart) fails this one, not the other.
                os.link(temporary, final)
                os.unlink(temporary)
            else:
                os.rename(temporary, final)
        except BaseException:
            # A full disk must not leave a stray file that warns at every start.
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        self._sync_directory(self.directory)
        message.path = final

    def remove(self, message: Message) -> None:
        if message.path:
            try:
                os.unlink(message.path)
            except FileNotFoundError:
                pass
            self._sync_directory(self.directory)
            message.path = None

    def move_to_failed(self, message: Message) -> None:
        if message.path:
            os.rename(message.path, os.path.join(self.failed, os.path.basename(message.path)))
            self._sync_directory(self.failed)
            self._sync_directory(self.directory)
            message.path = None

    def load(self) -> list[Message]:
        """Every message in the spool, in arrival order; bad files are skipped."""
        messages = []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if not name.endswith(".msg") or not os.path.isfile(path):
                continue
            try:
                message = self._read(path, name[:-4])
            except Exception as exc:  # any file we cannot read (a RecursionError from
                # "DISPATCH 1 [[[[...", say) is skipped: one bad file must not stop start-up
                log.error("spool: skipping %s, left in place: %s: %s", path,
                          type(exc).__name__, exc)
                continue
            messages.append(message)
        for name in os.listdir(self.tmp):
            log.warning("spool: %s was not finished before a crash; "
                        "it was never acknowledged and is left in place",
                        os.path.join(self.tmp, name))
        messages.sort(key=lambda m: (m.arrived, m.id))
        return messages

    def _read(self, path: str, queue_id: str) -> Message:
        with open(path, "rb") as handle:
            header = handle.readline()
            data = handle.read()
        if not header.startswith(self.MAGIC) or not header.endswith(b"\n"):
            raise ValueError("not a Dispatch spool file of this version")
        envelope = json.loads(header[len(self.MAGIC):])
        if len(data) != envelope["size"]:
            raise ValueError(f"truncated: {len(data)} of {envelope['size']} bytes")
        if not envelope["recipients"]:
            raise ValueError("no recipients")
        message = Message(queue_id, envelope["sender"], envelope["recipients"], data,
                          bool(envelope["smtputf8"]), bool(envelope["body_8bit"]),
                          envelope.get("client", ""), float(envelope["arrived"]))
        message.path = path
        return message

    @staticmethod
    def _sync_directory(directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class QueueClosed(Exception):
    """The relay is stopping and has no spool: it can no longer own new mail."""


class Queue:
    """The messages Dispatch owns, in arrival order.

    A deque under one lock; `arrived` wakes the flusher when
    DISPATCH_INTERVAL is 0.
    """

    def __init__(self, max_bytes: int, spool: Optional[Spool]) -> None:
        self.max_bytes = max_bytes
        self.spool = spool
        self.messages: collections.deque[Message] = collections.deque()
        self.bytes = 0
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.wake_on_arrival = False   # DISPATCH_INTERVAL=0: the flusher waits for mail
        self.closed = False            # the last flush has begun

    def __len__(self) -> int:
        return len(self.messages)

    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def put(self, message: Message) -> bool:
        """Take ownership of the message; False when it does not fit."""
        size = len(message.data)
        with self.lock:
            if self.closed and not self.spool:
                raise QueueClosed   # the last flush would never see it
            if self.bytes + size > self.max_bytes:
                return False
            self.bytes += size   # reserved before the slow disk write
        try:
            if self.spool:
                self.spool.write(message)
        except OSError:
            with self.lock:
                self.bytes -= size
            raise
        with self.lock:
            self.messages.append(message)
            if self.wake_on_arrival:
                self.arrived.notify_all()
        return True

    def restore(self, messages: Iterable[Message]) -> None:
        with self.lock:
            for message in messages:
                self.messages.append(message)
                self.bytes += len(message.data)

    def due(self, now: float, everything: bool = False) -> list[Message]:
        with self.lock:
            return [m for m in self.messages if everything or m.next_try <= now]

    def oldest(self) -> Optional[float]:
        with self.lock:
            return self.messages[0].arrived if self.messages else None

    def remove(self, message: Message, failed: bool = False) -> None:
        """The message has its final answers: drop it (and its spool file)."""
        with self.lock:
            try:
                self.messages.remove(message)
            except ValueError:
                return
            self.bytes -= len(message.data)
        if self.spool:
            try:
                (self.spool.move_to_failed if failed else self.spool.remove)(message)
            except OSError as exc:
                log.error("%s: spool: cannot remove %s: %s", message.id, message.path, exc)

    def update(self, message: Message) -> None:
        """Recipients changed: rewrite the spool file so a restart resends only these."""
        if self.spool and message.path:
            try:
                self.spool.write(message)
            except OSError as exc:
                log.error("%s: spool: cannot update %s: %s", message.id, message.path, exc)


# ===========================================================================
# 4. Delivery to the upstream
# ===========================================================================


class BatchFailed(Exception):
    """The upstream connection could not be set up: no message is at fault."""


class ConnectionLost(Exception):
    """The upstream went away (or said 421) in the middle of a batch."""


def add_reply_to(data: bytes, address: str) -> bytes:
    """Add a Reply-To header to a message that has none."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end + 2]
    if re.search(rb"(?im)^reply-to[ \t]*:", head):
        return data
    field = b"Reply-To: " + address.encode("utf-8") + b"\r\n"
    if end < 0:
        return data + (b"" if not data or data.endswith(b"\r\n") else b"\r\n") + field
    return data[:end + 2] + field + data[end + 2:]



def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def reply_text(code: int, text: bytes) -> str:
    """An upstream reply as one log-safe line."""
    return f"{code} {text.decode('utf-8', 'replace')}".replace("\n", " ")


LEADING_DOT = re.compile(rb"(?m)^\.")
RSET = b"RSET\r\n"


class Outcome:
    """The upstream's answer for each recipient of one message in one attempt."""

    __slots__ = ("message", "answers")

    def __init__(self, message: Message) -> None:
        self.message = message
        self.answers: dict[str, tuple[int, str]] = {}

    def answer(self, recipients: Iterable[str], code: int, text: str) -> None:
        for recipient in recipients:
            self.answers[recipient] = (code, text)


class Upstream:
    """One connection to the upstream provider, carrying a batch of messages."""

    def __init__(self, config: Config, tls_context: ssl.SSLContext, timeout: float) -> None:
        self.config = config
        self.tls_context = tls_context
        self.timeout = timeout
        self.smtp: Optional[smtplib.SMTP] = None
        self.name = f"{config.upstream_host}:{config.upstream_port}"
        self.transaction_open = False
        self.current: Optional[Outcome] = None   # MAIL accepted, outcome not yet reported

    # -- setting up the connection ----------------------------------------

    def connect(self) -> None:
        """Connect, EHLO, STARTTLS and AUTH; BatchFailed if any step fails."""
        config = self.config
        try:
            if config.upstream_tls == "tls":
                self.smtp = smtplib.SMTP_SSL(config.upstream_host, config.upstream_port,
                                             local_hostname=config.relay_host,
                                             timeout=self.timeout, context=self.tls_context)
            else:
                self.smtp = smtplib.SMTP(config.upstream_host, config.upstream_port,
                                         local_hostname=config.relay_host, timeout=self.timeout)
            code, text = self.smtp.ehlo()
            if code != 250:
                code, text = self.smtp.helo()
                if code != 250:
                    raise BatchFailed(f"HELO refused: {reply_text(code, text)}")
            if config.upstream_tls == "starttls":
                if not self.smtp.has_extn("starttls"):
                    raise BatchFailed("upstream does not offer STARTTLS; no credentials or "
                                      "mail sent (UPSTREAM_TLS=none allows cleartext)")
                code, text = self.smtp.starttls(context=self.tls_context)
                if code != 220:
                    raise BatchFailed(f"STARTTLS refused: {reply_text(code, text)}")
                self.smtp.ehlo()
            if config.upstream_user:
                self.authenticate()
        except BatchFailed:
            self.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise BatchFailed(f"upstream certificate not trusted: {exc.verify_message}") from None
        except smtplib.SMTPResponseException as exc:
            self.close()
            raise BatchFailed(reply_text(exc.smtp_code, exc.smtp_error)) from None
        except (OSError, smtplib.SMTPException) as exc:
            self.close()
            raise BatchFailed(f"cannot talk to {self.name}: "
                              f"{exc or type(exc).__name__}") from None

    def authenticate(self) -> None:
        """AUTH PLAIN, or LOGIN when that is all the upstream offers (Office 365)."""
        smtp = self.smtp
        offered = smtp.esmtp_features.get("auth", "").upper().split()
        user = self.config.upstream_user.encode("utf-8")
        password = self.config.upstream_pass.encode("utf-8")
        if "PLAIN" in offered:
            mechanism = "PLAIN"
            code, text = smtp.docmd("AUTH", "PLAIN " + b64(b"\0" + user + b"\0" + password))
        elif "LOGIN" in offered:
            mechanism = "LOGIN"
            code, text = smtp.docmd("AUTH", "LOGIN")
            for answer in (user, password):
                if code == 334:
                    code, text = smtp.docmd(b64(answer))
        else:
            raise BatchFailed("upstream offers neither AUTH PLAIN nor AUTH LOGIN")
        if code != 235:
            raise BatchFailed(f"AUTH {mechanism} refused: {reply_text(code, text)}")

    def close(self) -> None:
        if self.smtp is not None:
            try:
                self.smtp.quit()
            except (OSError, smtplib.SMTPException):
                self.smtp.close()
            self.smtp = None

    # -- sending messages -------------------------------------------------

    def send(self, messages: Iterable[Message], report: Callable[[Outcome], None]) -> None:
        """Send messages in order; report each one's outcome as soon as it is known.

        With PIPELINING (RFC 2920) each round trip carries the previous
        message's data and the next message's MAIL, RCPTs and DATA, and every
        reply is still read in order.  Raises ConnectionLost when the upstream
        drops or says 421: a message not reported was not accepted (one lost in
        the middle of its own transaction is reported, with a 421).
        """
        pipelining = self.smtp.has_extn("pipelining")
        in_flight: Optional[tuple[Outcome, list[bytes]]] = None   # DATA got 354

        def done(outcome: Outcome) -> None:
            if self.current is outcome:
                self.current = None
            report(outcome)

        try:
            for message in messages:
                outcome = Outcome(message)
                if message.smtputf8 and not self.smtp.has_extn("smtputf8"):
                    outcome.answer(message.recipients, 550,
                                   "550 5.6.7 upstream does not support SMTPUTF8")
                    done(outcome)
                    continue
                commands = self._envelope(message)
                if pipelining:
                    self.smtp.send(b"".join((in_flight[1] if in_flight else []) + commands))
                elif in_flight:
                    self.smtp.send(b"".join(in_flight[1]))
                if in_flight:
                    done(self._finish(in_flight[0]))
                in_flight = self._start(outcome, commands, pipelining)
                if in_flight is None:
                    done(outcome)
            if in_flight:
                self.smtp.send(b"".join(in_flight[1]))
                done(self._finish(in_flight[0]))
        except (ConnectionLost, smtplib.SMTPException, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            lost = self.current
            if lost is not None:
                # Lost inside a message's own transaction (its MAIL accepted, no
                # final answer yet): maybe its fault (its size, its content), so
                # it waits for its own retry instead of going first again on
                # every reconnect and stalling the rest of the batch.
                lost.answer([r for r in lost.message.recipients if r not in lost.answers],
                            421, f"421 connection lost during the message: {reason}")
                done(lost)
            raise ConnectionLost(reason) from None

    def _envelope(self, message: Message) -> list[bytes]:
        """RSET when a refused transaction is still open, MAIL, RCPTs, DATA."""
        sender = self.config.upstream_from or message.sender
        mail = f"MAIL FROM:<{sender}>"
        if self.smtp.has_extn("size"):
            mail += f" SIZE={len(message.data)}"
        if message.body_8bit and self.smtp.has_extn("8bitmime"):
            mail += " BODY=8BITMIME"
        if message.smtputf8:
            mail += " SMTPUTF8"
        commands = [RSET] if self.transaction_open else []
        commands.append(mail.encode("utf-8") + b"\r\n")
        commands.extend(f"RCPT TO:<{r}>\r\n".encode("utf-8") for r in message.recipients)
        commands.append(b"DATA\r\n")
        return commands

    def _read(self) -> tuple[int, str]:
        code, text = self.smtp.getreply()
        if code == 421:
            raise ConnectionLost(reply_text(code, text))
        return code, reply_text(code, text)

    def _start(self, outcome: Outcome, commands: list[bytes],
               pipelined: bool) -> Optional[tuple[Outcome, list[bytes]]]:
        """Read the envelope's replies; (outcome, data to send) when DATA got 354.

        Unpipelined, each command is sent when the previous reply allows it.
        """
        def ask(command: bytes) -> tuple[int, str]:
            if not pipelined:
                self.smtp.send(command)
            return self._read()

        message = outcome.message
        if commands[0] == RSET:
            ask(commands.pop(0))
            self.transaction_open = False
        mail_code, mail_text = ask(commands[0])
        accepted = []
        if mail_code == 250:
            self.current = outcome   # from here a lost connection is this message's
            self.transaction_open = True
        if mail_code == 250 or pipelined:
            for recipient, command in zip(message.recipients, commands[1:-1]):
                code, text = ask(command)
                if mail_code != 250:
                    continue  # answers to RCPTs of a refused MAIL mean nothing
                if code in (250, 251):
                    accepted.append(recipient)
                else:
                    outcome.answer([recipient], code, text)
        if mail_code != 250:
            outcome.answer(message.recipients, mail_code, mail_text)
        if not pipelined and not accepted:
            return None
        code, text = ask(commands[-1])
        if code == 354:
            self.transaction_open = False
            if accepted:
                return outcome, self._payload(message)
            # A lax upstream opened DATA with no recipient: end it empty.
            self.smtp.send(b".\r\n")
            self._read()
        elif accepted:
            outcome.answer(accepted, code, text)
        return None

    def _payload(self, message: Message) -> list[bytes]:
        """The message as it goes on the wire, dot-stuffed, ended by CRLF.CRLF."""
        data = message.data
        if self.config.upstream_replyto:
            data = add_reply_to(data, self.config.upstream_replyto)
        if b"\n." in data or data.startswith(b"."):
            data = LEADING_DOT.sub(b"..", data)
        ending = b".\r\n" if not data or data.endswith(b"\r\n") else b"\r\n.\r\n"
        return [data, ending]

    def _finish(self, outcome: Outcome) -> Outcome:
        """Read the end-of-data reply of a message whose data was sent."""
        code, text = self._read()
        outcome.answer([r for r in outcome.message.recipients if r not in outcome.answers],
                       code, text)
        return outcome


def recipients_text(recipients: Iterable[str]) -> str:
    return ",".join(f"<{r}>" for r in recipients)


class Flusher(threading.Thread):
    """The timer thread: every DISPATCH_INTERVAL, send what is due in one batch."""

    MAX_FRUITLESS_RECONNECTS = 3

    def __init__(self, relay: "Relay") -> None:
        super().__init__(name="flusher", daemon=True)
        self.relay = relay
        self.config = relay.config
        self.queue = relay.queue
        self.metrics = relay.metrics
        self.tls_context = relay.config.upstream_tls_context()
        self.base_delay = max(self.config.interval, 1.0)
        self.upstream_name = f"{self.config.upstream_host}:{self.config.upstream_port}"
        self.failed_flushes = 0
        self.stopping = False
        self.deadline: Optional[float] = None  # monotonic end of the final flush

    def retry_delay(self, failures: int) -> float:
        """max(interval, 1) x 2^(failures-1), at most DISPATCH_RETRY_MAX."""
        return min(self.base_delay * 2 ** min(failures - 1, 40), self.config.retry_max)

    def stop(self, deadline: float) -> None:
        """Ask for one last flush of everything, to end by `deadline` (monotonic)."""
        with self.queue.lock:
            self.stopping = True
            self.queue.closed = True
            self.deadline = deadline
            self.queue.arrived.notify_all()

    def run(self) -> None:
        # Mail restored from the spool goes out at once, not an interval later.
        next_flush = time.monotonic() + (0 if len(self.queue) else self.config.interval)
        while True:
            with self.queue.lock:
                while not self.stopping:
                    wait = self.seconds_to_wait(next_flush)
                    if wait is not None and wait <= 0:
                        break
                    self.queue.arrived.wait(wait)
                stopping = self.stopping
            try:
                ok = self.flush(everything=stopping)
            except Exception:  # the timer thread must survive any bug in one flush
                log.exception("flush failed unexpectedly")
                ok = self.flush_done(time.time(), ok=False)
            if stopping:
                return
            next_flush = time.monotonic() + (
                self.config.interval if ok else self.retry_delay(self.failed_flushes))

    def seconds_to_wait(self, next_flush: float) -> Optional[float]:
        """How long until the next flush (None: until mail arrives); queue lock held."""
        if self.failed_flushes or self.config.interval > 0:
            return next_flush - time.monotonic()
        due = min((m.next_try for m in self.queue.messages), default=None)
        return None if due is None else due - time.time()

    # -- one flush --------------------------------------------------------

    def timeout(self) -> float:
        if self.deadline is None:
            return 60.0
        return max(0.1, min(60.0, self.deadline - time.monotonic()))

    def flush(self, everything: bool = False) -> bool:
        """One batch; False when messages were left deferred as a whole."""
        started = time.time()
        # Expiry looks at every message, not only the due ones, so a message
        # waiting out a long retry delay is still given up on time.
        batch = [m for m in self.expire(self.queue.due(started, everything=True))
                 if everything or m.next_try <= started]
        if not batch:
            return self.flush_done(started, ok=True)
        # Queue IDs, not id(): a sent message is freed and a new arrival can get
        # its id(), then be skipped and sent after mail that came later.
        tried: set[str] = set()
        reported: set[str] = set()
        answered: list[str] = []     # messages with a final answer (2xx or 5xx)

        def report(outcome: Outcome) -> None:
            reported.add(outcome.message.id)
            if any(code < 400 or code >= 500 for code, _ in outcome.answers.values()):
                answered.append(outcome.message.id)
            self.settle(outcome)

        fruitless = 0
        while batch:
            upstream = Upstream(self.config, self.tls_context, self.timeout())
            try:
                upstream.connect()
            except BatchFailed as exc:
                self.defer_all(batch, str(exc))
                break
            answered_before = len(answered)
            try:
                # Mail that arrives while the batch is being sent joins it.
                while batch:
                    tried.update(m.id for m in batch)
                    upstream.send(batch, report)
                    batch = [m for m in self.queue.due(time.time(), everything)
                             if m.id not in tried]
            except ConnectionLost as exc:
                batch = [m for m in batch if m.id not in reported]
                # Only a final answer is progress: an upstream that drops every
                # connection inside a message gets a bounded number of tries.
                fruitless = 0 if len(answered) > answered_before else fruitless + 1
                if fruitless >= self.MAX_FRUITLESS_RECONNECTS or (
                        self.deadline is not None and time.monotonic() >= self.deadline):
                    self.defer_all(batch, f"upstream connection lost: {exc}")
                    break
                log.info("upstream %s: %s; reconnecting for %d message(s)",
                         upstream.name, exc, len(batch))
            finally:
                upstream.close()
        return self.flush_done(started, ok=not batch)   # a leftover was deferred as a whole

    def flush_done(self, started: float, ok: bool) -> bool:
        """Count a flush in a row of failures (backoff, /healthz) and in the metrics."""
        self.failed_flushes = 0 if ok else self.failed_flushes + 1
        self.metrics.flush_done(started, ok)
        return ok

    def expire(self, batch: list[Message]) -> list[Message]:
        """Give up messages older than DISPATCH_MAX_AGE; return the others."""
        now = time.time()
        keep = []
        for message in batch:
            if now - message.arrived <= self.config.max_age:
                keep.append(message)
                continue
            log.warning("%s: to=%s, status=expired, given up after %.0f s in the queue "
                        "(DISPATCH_MAX_AGE)", message.id, recipients_text(message.recipients),
                        now - message.arrived)
            self.metrics.count("failed")
            self.queue.remove(message, failed=True)
        return keep

    def defer_all(self, batch: list[Message], reason: str) -> None:
        """The batch failed as a whole: no message gets a mark against it."""
        for message in batch:
            log.warning("%s: to=%s, relay=%s, status=deferred (%s)", message.id,
                        recipients_text(message.recipients), self.upstream_name, reason)
        self.metrics.batch_deferred(len(batch), reason)

    def settle(self, outcome: Outcome) -> None:
        """Log each recipient's answer; requeue the 4xx ones, finish the rest."""
        message = outcome.message
        by_status: dict[tuple[str, str], list[str]] = {}
        for recipient in message.recipients:
            code, text = outcome.answers.get(recipient, (451, "no answer"))
            status = "sent" if code < 400 else "failed" if code >= 500 else "deferred"
            by_status.setdefault((status, text), []).append(recipient)
        for (status, text), recipients in by_status.items():
            log.log(logging.INFO if status == "sent" else logging.WARNING,
                    "%s: to=%s, relay=%s, status=%s (%s)", message.id,
                    recipients_text(recipients), self.upstream_name, status, text)
        sent = any(status == "sent" for status, _ in by_status)
        deferred = [r for (status, _), rs in by_status.items() if status == "deferred" for r in rs]
        if sent:
            self.metrics.count("sent")
        if deferred:
            self.metrics.count("deferred")
            changed = deferred != message.recipients
            message.recipients = deferred
            message.attempts += 1
            message.next_try = time.time() + self.retry_delay(message.attempts)
            if changed:
                self.queue.update(message)
        else:
            if not sent:
                self.metrics.count("failed")
            self.queue.remove(message, failed=not sent)


# ===========================================================================
# 5. Health and metrics
# ===========================================================================


class Metrics:
    """Counters since start, and what /healthz reports (SPEC section 5)."""

    COUNTERS = {
        "accepted": "Messages accepted from clients (250 after DATA).",
        "sent": "Messages the upstream accepted for at least one recipient.",
        "deferred": "Messages left queued after a delivery attempt.",
        "failed": "Messages given up: refused with 5xx or expired.",
        "auth_failures": "Failed AUTH commands from clients.",
        "flush_failures": "Flushes that failed as a whole.",
    }
    # Exported at 0 from the start: a series that appears with its first
    # refusal hides that refusal from rate() and increase().
    REFUSALS = ("auth", "auth_required", "size", "queue_full", "recipients", "connections",
                "spool_error", "shutdown")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.refusals: dict[str, int] = dict.fromkeys(self.REFUSALS, 0)
        self.last_flush = 0.0
        self.last_flush_duration = 0.0
        self.batch_error = ""   # why the last batch was deferred as a whole

    def count(self, name: str) -> None:
        with self.lock:
            self.counters[name] += 1

    def batch_deferred(self, n: int, reason: str) -> None:
        with self.lock:
            self.counters["deferred"] += n
            self.batch_error = " ".join(reason.split())   # /healthz says it on one line

    def refused(self, reason: str) -> None:
        with self.lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def flush_done(self, started: float, ok: bool) -> None:
        with self.lock:
            self.last_flush = time.time()
            self.last_flush_duration = self.last_flush - started
            if not ok:
                self.counters["flush_failures"] += 1

    def render(self, relay: "Relay") -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        out = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
            out.append(f"# HELP dispatch_{name} {help_text}")
            out.append(f"# TYPE dispatch_{name} {kind}")
            # repr: every digit of a float; "{:g}" would round a Unix time to 6 digits.
            out.extend(f"dispatch_{name}{labels} {value!r}" for labels, value in samples)

        with self.lock:
            counters = dict(self.counters)
            refusals = dict(self.refusals)
            last_flush, last_duration = self.last_flush, self.last_flush_duration
        for name in ("accepted", "sent", "deferred", "failed"):
            metric(f"messages_{name}_total", "counter", self.COUNTERS[name], [("", counters[name])])
        metric("messages_refused_total", "counter", "Messages or commands refused at the listener.",
               [(f'{{reason="{label_value(reason)}"}}', n)
                for reason, n in sorted(refusals.items())])
        metric("auth_failures_total", "counter", self.COUNTERS["auth_failures"],
               [("", counters["auth_failures"])])
        metric("flush_failures_total", "counter", self.COUNTERS["flush_failures"],
               [("", counters["flush_failures"])])
        oldest = relay.queue.oldest()
        metric("queue_messages", "gauge", "Messages in the queue.", [("", len(relay.queue))])
        metric("queue_bytes", "gauge", "Bytes of message data in the queue.",
               [("", relay.queue.bytes)])
        metric("queue_oldest_age_seconds", "gauge", "Age of the oldest queued message.",
               [("", float(time.time() - oldest) if oldest else 0.0)])
        metric("last_flush_timestamp_seconds", "gauge", "When the last flush ended (Unix time).",
               [("", float(last_flush))])
        metric("last_flush_duration_seconds", "gauge", "How long the last flush took.",
               [("", float(last_duration))])
        metric("sessions_open", "gauge", "Client sessions open now.", [("", relay.connections)])
        return "\n".join(out) + "\n"

    def health(self, relay: "Relay") -> Optional[str]:
        """None when healthy, else the one-line reason."""
        if relay.draining:
            return "shutting down: the listener is closed"
        failures = relay.flusher.failed_flushes
        with self.lock:
            reason = self.batch_error
        if failures >= 3:
            return f"the last {failures} flushes to the upstream failed: {reason}"
        return None


def label_value(text: str) -> str:
    """A label value escaped for the Prometheus text format: \\ " and line feed."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    """GET /healthz and GET /metrics."""

    server_version = "dispatch/" + __version__
    timeout = 10   # an idle scraper must not hold a thread forever

    def do_GET(self) -> None:
        relay: Relay = self.server.relay
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            problem = relay.metrics.health(relay)
            status, body, kind = (200, "ok\n", "text/plain") if problem is None else (
                503, problem + "\n", "text/plain")
        elif path == "/metrics":
            status, body = 200, relay.metrics.render(relay)
            kind = "text/plain; version=0.0.4"
        else:
            status, body, kind = 404, "not found\n", "text/plain"
        payload = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", kind + "; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:
        log.debug("metrics: " + format, *args)


# ===========================================================================
# 6. The server's life cycle
# ===========================================================================


def address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Listener(socketserver.ThreadingTCPServer):
    """The SMTP listening socket: a thread per session, a cap on sessions."""

    allow_reuse_address = True   # a restarted relay binds at once, even after kill -9
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, relay: "Relay", address: tuple[str, int], implicit_tls: bool) -> None:
        self.address_family = address_family(address[0])
        self.relay = relay
        self.implicit_tls = implicit_tls
        super().__init__(address, Session)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self.relay.open_session_slot():
            self.relay.metrics.refused("connections")
            try:
                request.sendall(encode_reply(
                    R_TOO_MANY_CONNECTIONS.format(self.relay.config.relay_host)))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.relay.close_session_slot()
            raise

    def handle_error(self, request, client_address) -> None:
        log.error("session %s:%s ended by an internal error: %r", *client_address[:2],
                  sys.exc_info()[1])
        log.debug("the internal error in full", exc_info=True)


class MetricsServer(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, relay: "Relay", address: tuple[str, int]) -> None:
        self.address_family = address_family(address[0])
        self.relay = relay
        super().__init__(address, MetricsHandler)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics: request from %s failed: %s", client_address[0], sys.exc_info()[1])


def listen(variable: str, make: Callable[[], socketserver.TCPServer]):
    """Bind a listener; a port that cannot be had is a start-up error naming `variable`."""
    try:
        return make()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot listen: {exc.strerror or exc}") from None


class Relay:
    """The whole relay: listeners, queue, flusher and metrics, started and drained."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tls_context = config.server_tls_context()
        self.metrics = Metrics()
        self.spool = Spool(config.spool) if config.spool else None
        self.queue = Queue(config.max_queue, self.spool)
        self.flusher = Flusher(self)
        self.listeners: list[Listener] = []
        self.metrics_server: Optional[MetricsServer] = None
        self.draining = False
        self.sessions: set[Session] = set()
        self.connections = 0
        self.sessions_lock = threading.Condition()
        self._password_key = os.urandom(32)
        self._remembered_password: Optional[bytes] = None

    # -- sessions ---------------------------------------------------------

    def open_session_slot(self) -> bool:
        with self.sessions_lock:
            if self.connections >= self.config.max_connections:
                return False
            self.connections += 1
            return True

    def close_session_slot(self) -> None:
        with self.sessions_lock:
            self.connections -= 1
            self.sessions_lock.notify_all()

    def session_opened(self, session: Session) -> None:
        with self.sessions_lock:
            self.sessions.add(session)

    def session_closed(self, session: Session) -> None:
        with self.sessions_lock:
            self.sessions.discard(session)
        self.close_session_slot()

    def check_password(self, user: bytes, password: bytes) -> bool:
        """bcrypt once per process for the right password, then a keyed digest.

        The digest stays in memory only; a wrong password always pays bcrypt.
        """
        user_ok = hmac.compare_digest(user, self.config.username.encode("utf-8"))
        digest = hmac.new(self._password_key, password, hashlib.sha256).digest()
        remembered = self._remembered_password
        if remembered is None or not hmac.compare_digest(digest, remembered):
            try:
                if not bcrypt.checkpw(password, self.config.password_hash):
                    return False
            except ValueError:   # e.g. longer than bcrypt's 72 bytes
                return False
            self._remembered_password = digest
        return user_ok

    def accept(self, message: Message) -> str:
        """Take ownership of a received message; return the reply for its DATA."""
        try:
            if not self.queue.put(message):
                self.metrics.refused("queue_full")
                return R_QUEUE_FULL
        except OSError as exc:
            log.error("%s: not accepted: cannot write to the spool: %s", message.id, exc)
            self.metrics.refused("spool_error")
            return R_LOCAL_ERROR
        except QueueClosed:
            self.metrics.refused("shutdown")
            return R_SHUTDOWN.format(self.config.relay_host)
        self.metrics.count("accepted")
        log.info("%s: accepted from=<%s>, nrcpt=%d, size=%d, client=%s", message.id,
                 message.sender, len(message.recipients), len(message.data), message.client)
        return R_QUEUED.format(message.id)

    # -- start, run, drain ------------------------------------------------

    def start(self) -> None:
        """Restore the spool, bind the listeners, start the flusher."""
        config = self.config
        self.listeners.append(listen("RELAY_PORT", lambda: Listener(
            self, (config.bind, config.port), implicit_tls=False)))
        if config.tls_port:
            self.listeners.append(listen("RELAY_TLS_PORT", lambda: Listener(
                self, (config.bind, config.tls_port), implicit_tls=True)))
        if config.metrics_port:
            self.metrics_server = listen("DISPATCH_METRICS_PORT", lambda: MetricsServer(
                self, (config.metrics_bind, config.metrics_port)))
        if self.spool:
            try:
                restored = self.spool.load()
            except OSError as exc:
                raise ConfigError(f"DISPATCH_SPOOL: cannot read {config.spool}: "
                                  f"{exc.strerror or exc}") from None
            self.queue.restore(restored)
            log.info("spool %s: %d message(s) restored", config.spool, len(restored))
        self.queue.wake_on_arrival = config.interval == 0
        for server in self.listeners + [self.metrics_server]:
            if server is not None:
                # A short poll interval makes a drain's listener.shutdown() prompt.
                threading.Thread(target=server.serve_forever, args=(0.1,), name="listener",
                                 daemon=True).start()
        self.flusher.start()
        tls = "STARTTLS" if self.tls_context else "no TLS"
        log.info("dispatch %s listening on %s port %d (%s%s), upstream %s:%d (%s), "
                 "flush every %gs", __version__, config.bind, self.listeners[0].server_address[1],
                 tls, f", implicit TLS on {config.tls_port}" if config.tls_port else "",
                 config.upstream_host, config.upstream_port, config.upstream_tls, config.interval)
        if not self.tls_context:
            log.warning("no RELAY_TLS_CERT: client passwords travel unencrypted; "
                        "use this only on a trusted network")
        elif not config.require_tls:
            log.warning("RELAY_REQUIRE_TLS=0: clients may send their password before "
                        "STARTTLS, unencrypted")

    def drain(self) -> None:
        """SIGTERM: stop listening, finish DATA in progress, flush once more."""
        start = time.monotonic()
        deadline = start + self.config.drain_timeout
        # A client stuck in DATA may use half the drain, never the last flush's share.
        data_deadline = start + self.config.drain_timeout / 2
        log.info("shutting down: draining for up to %gs", self.config.drain_timeout)
        for listener in self.listeners:
            listener.shutdown()
            listener.server_close()
        with self.sessions_lock:
            self.draining = True
            for session in self.sessions:
                if not session.in_data:
                    try:  # wakes a session waiting for a command; it answers 421
                        socket.socket.shutdown(session.sock, socket.SHUT_RD)
                    except OSError:
                        pass
            self.sessions_lock.wait_for(
                lambda: not any(s.in_data for s in self.sessions),
                timeout=max(0.0, data_deadline - time.monotonic()))
        self.flusher.stop(deadline)
        self.flusher.join(max(0.0, deadline - time.monotonic()))
        left = len(self.queue)
        if left and self.spool:
            log.info("%d undelivered message(s) stay in the spool %s", left, self.config.spool)
        elif left:
            log.error("%d undelivered message(s) lost: no DISPATCH_SPOOL is set", left)
        if self.metrics_server:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        log.info("stopped")


# ===========================================================================
# 7. Command line
# ===========================================================================

VARIABLES = """\
configuration (environment variables; see README.md and example.env):
  RELAY_USERNAME, RELAY_PASSWORD   client credentials (required; the password as a bcrypt hash)
  UPSTREAM_HOST                    upstream SMTP server (required)
  UPSTREAM_PORT=587                UPSTREAM_USER, UPSTREAM_PASS (unset: no AUTH upstream)
  UPSTREAM_TLS=starttls|tls|none   UPSTREAM_TLS_VERIFY=1, UPSTREAM_CA_FILE
  UPSTREAM_FROM, UPSTREAM_REPLYTO  envelope sender override, Reply-To added when missing
  RELAY_HOST=<fqdn>  RELAY_BIND=0.0.0.0  RELAY_PORT=25  RELAY_TLS_PORT (implicit TLS)
  RELAY_TLS_CERT, RELAY_TLS_KEY    PEM files: offer STARTTLS
  RELAY_REQUIRE_TLS                1 by default with a certificate: no AUTH before STARTTLS
  RELAY_MAX_SIZE=10485760  RELAY_MAX_RECIPIENTS=100  RELAY_TIMEOUT=300
  RELAY_MAX_CONNECTIONS=100
  DISPATCH_INTERVAL=60             seconds between flushes (0: as soon as mail arrives)
  DISPATCH_SPOOL                   directory: every message on disk before its 250
  DISPATCH_MAX_QUEUE=268435456  DISPATCH_MAX_AGE=432000  DISPATCH_RETRY_MAX=3600
  DISPATCH_DRAIN_TIMEOUT=30        DISPATCH_METRICS_PORT, DISPATCH_METRICS_BIND
  LOG_LEVEL=INFO
"""


def load_env_file(path: str, environ: dict) -> None:
    """Add KEY=VALUE lines to `environ`; variables already set win."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--env-file: cannot read {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfigError(f"--env-file: {path} line {number} is not KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        environ.setdefault(key, value)


def hash_password() -> int:
    """Read a password (prompt on a terminal, else one line of stdin); print its hash."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("dispatch: the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    encoded = password.encode("utf-8")
    if not encoded:
        print("dispatch: empty password", file=sys.stderr)
        return 2
    if len(encoded) > 72:
        print("dispatch: bcrypt uses at most 72 bytes of a password; choose a shorter one",
              file=sys.stderr)
        return 2
    print(bcrypt.hashpw(encoded, bcrypt.gensalt()).decode("ascii"))
    return 0


def setup_logging(level: str) -> logging.handlers.QueueListener:
    """Log lines go through a queue so session threads never wait on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s dispatch[%(process)d]: %(levelname)s %(message)s"))
    records: queue_module.SimpleQueue = queue_module.SimpleQueue()
    listener = logging.handlers.QueueListener(records, handler)
    log.handlers[:] = [logging.handlers.QueueHandler(records)]
    log.setLevel(level)
    log.propagate = False
    listener.start()
    return listener


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dispatch.py",
        description="Dispatch: an authenticated ESMTP relay that queues mail and forwards "
                    "it in batches to one upstream SMTP server.",
        epilog=VARIABLES + "\ncommands:\n  hash-password  read a password (prompt, or one "
               "line of stdin) and print its bcrypt hash for RELAY_PASSWORD\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["run", "hash-password"], default="run",
                        help="run the relay (default), or hash-password")
    parser.add_argument("--env-file", metavar="FILE",
                        help="load KEY=VALUE lines first (the environment wins)")
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        return hash_password()
    environ = dict(os.environ)
    try:
        if args.env_file:
            load_env_file(args.env_file, environ)
        config = Config.from_env(environ)
        relay = Relay(config)
    except ConfigError as exc:
        print(f"dispatch: configuration error: {exc}", file=sys.stderr)
        return 2
    log_listener = setup_logging(config.log_level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        try:
            relay.start()
        except ConfigError as exc:
            print(f"dispatch: configuration error: {exc}", file=sys.stderr)
            return 2
        while not stop.wait(1.0):
            pass
        relay.drain()
        return 0
    finally:
        log_listener.stop()


if __name__ == "__main__":
    sys.exit(main())
