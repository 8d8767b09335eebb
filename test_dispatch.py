"""Tests for Dispatch, in the order of dispatch.py's sections (shared helpers first).

Everything runs on real sockets on 127.0.0.1: the relay (in this process, or
as a real `dispatch.py` process where the process matters), Python's smtplib
or a raw socket as the client, and aiosmtpd as an independent upstream.
Nothing waits with a bare sleep: `wait_for` polls a condition with a deadline.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import http.client
import ipaddress
import math
import os
import random
import re
import signal
import smtplib
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import bcrypt
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import dispatch

# aiosmtpd warns that its test upstream takes AUTH without TLS: that is the point.
pytestmark = [pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

HERE = Path(__file__).resolve().parent
DISPATCH = HERE / "dispatch.py"
USER, PASSWORD = "app", "s3cret-pass"
# Cost 4 keeps the suite fast; the relay accepts any bcrypt cost.
PASSWORD_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
UPSTREAM_USER, UPSTREAM_PASS = "provider-user", "provider-pass"


# ---------------------------------------------------------------------------
# Helpers: polling, ports, an upstream, a relay, a raw client
# ---------------------------------------------------------------------------


def wait_for(condition, timeout=10.0, what="condition"):
    """Poll `condition` until it is truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _ports_below_the_ephemeral_range() -> range:
    """Ports no outgoing connection takes as its source port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    return range(20000, low) if low > 21000 else range(20000, 32768)


PORTS = _ports_below_the_ephemeral_range()


def free_port() -> int:
    """A random free port below the ephemeral range: an outgoing connection's
    source port cannot take it before the relay or the upstream binds it."""
    for _ in range(200):
        port = random.choice(PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port below the ephemeral range")


@contextlib.contextmanager
def closed_port():
    """A port where nothing listens, held for the block: bound, never listening,
    so every connection to it is refused and no other socket can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def accepting(port, greeting=False) -> bool:
    """True if a connection to `port` is accepted; with `greeting`, only if it is
    then greeted with 220 (a relay with a free session slot)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return not greeting or s.recv(64).startswith(b"220")
    except OSError:
        return False


@pytest.fixture
def refused_port():
    with closed_port() as port:
        yield port


@dataclass
class Received:
    sender: str
    recipients: list
    data: bytes
    options: list


@dataclass
class UpstreamHandler:
    """An aiosmtpd handler that records what it receives and can be told to refuse.

    `mail_replies` / `data_replies`: replies used, one each, for the next MAIL
    commands / ends of data; `rcpt_replies`: a fixed reply per address.
    """

    received: list = field(default_factory=list)
    mail_replies: list = field(default_factory=list)
    rcpt_replies: dict = field(default_factory=dict)
    data_replies: list = field(default_factory=list)
    pipelining: bool = True
    connections: int = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.connections += 1
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_replies:
            return self.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            return self.data_replies.pop(0)
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options)))
        return "250 2.0.0 Message accepted"


class LongLineSMTP(SMTP):
    """aiosmtpd answers 500 to a text line over 1,000 bytes (RFC 5321 4.5.3.1.6);
    this one takes lines up to 1 MiB, like providers that allow them."""

    line_length_limit = 1 << 20


class Upstream:
    """A real SMTP server (aiosmtpd) standing in for the provider."""

    def __init__(self, port=None, auth=True, pipelining=True, long_lines=False, **kwargs):
        self.handler = UpstreamHandler(pipelining=pipelining)
        self.port = port or free_port()
        self.logins = []
        options = dict(auth_require_tls=False, enable_SMTPUTF8=True)
        if auth:
            options.update(authenticator=self.authenticate, auth_required=True)
        options.update(kwargs)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     **options)
        if long_lines:
            self.controller.factory = lambda: LongLineSMTP(self.handler,
                                                           **self.controller.SMTP_kwargs)
        self.password = UPSTREAM_PASS
        self.controller.start()
        self.running = True

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append(mechanism)
        ok = (auth_data.login.decode() == UPSTREAM_USER
              and auth_data.password.decode() == self.password)
        # handled=False: aiosmtpd then answers 535 itself (True would leave it silent).
        return AuthResult(success=ok, handled=False)

    @property
    def received(self):
        return self.handler.received

    def wait_received(self, count, timeout=10.0):
        wait_for(lambda: len(self.received) >= count, timeout,
                 f"{count} message(s) at the upstream")
        return self.received[:count]

    def stop(self):
        """Stop serving (a test may stop its upstream early; a second stop does nothing)."""
        if self.running:
            self.running = False
            self.controller.stop()


@pytest.fixture
def make_upstream():
    """Start upstreams (`cls`, Upstream by default); each is stopped at the end."""
    servers = []

    def make(cls=Upstream, **kwargs):
        server = cls(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def upstream(make_upstream):
    return make_upstream()


def relay_env(upstream_port, **overrides):
    env = {
        "RELAY_HOST": "relay.test",
        "RELAY_BIND": "127.0.0.1",
        "RELAY_PORT": str(free_port()),
        "RELAY_USERNAME": USER,
        "RELAY_PASSWORD": PASSWORD_HASH,
        "UPSTREAM_HOST": "127.0.0.1",
        "UPSTREAM_PORT": str(upstream_port),
        "UPSTREAM_USER": UPSTREAM_USER,
        "UPSTREAM_PASS": UPSTREAM_PASS,
        "UPSTREAM_TLS": "none",
        "DISPATCH_INTERVAL": "0",
        "DISPATCH_DRAIN_TIMEOUT": "5",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


@pytest.fixture
def make_relay(upstream):
    """Start an in-process relay (real sockets, real threads); drained at the end."""
    relays = []

    def make(upstream_port=None, **overrides):
        config = dispatch.Config.from_env(relay_env(upstream_port or upstream.port, **overrides))
        relay = dispatch.Relay(config)
        relay.start()
        relay.port = relay.listeners[0].server_address[1]
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        if not relay.draining:
            relay.drain()


@pytest.fixture
def relay(make_relay):
    return make_relay()


def client(relay, login=True) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test", timeout=10)
    if login:
        smtp.login(USER, PASSWORD)
    return smtp


def auth_plain(user=USER, password=PASSWORD, identity="") -> bytes:
    """An AUTH PLAIN command line with its initial response (RFC 4616)."""
    return b"AUTH PLAIN " + base64.b64encode(f"{identity}\0{user}\0{password}".encode()) + b"\r\n"


class Raw:
    """A raw SMTP client: send exact bytes, read exact replies."""

    def __init__(self, port, greeting=True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        if greeting:
            self.expect(220)

    def send(self, data: bytes):
        self.sock.sendall(data)

    def reply(self):
        """(code, text) of one complete, possibly multi-line, reply; (None, '') at EOF."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return None, "\n".join(lines)
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def expect(self, code, command: bytes = None):
        if command is not None:
            self.send(command)
        got, text = self.reply()
        assert got == code, f"expected {code}, got {text!r}"
        return text

    def login(self):
        self.expect(250, b"EHLO client.test\r\n")
        self.expect(235, auth_plain())

    def start_data(self, sender="a@example.com", to=("b@example.com",)):
        """Log in, then MAIL, RCPT for each of `to` and DATA, each accepted: ready for data."""
        self.login()
        self.expect(250, f"MAIL FROM:<{sender}>\r\n".encode())
        for recipient in to:
            self.expect(250, f"RCPT TO:<{recipient}>\r\n".encode())
        self.expect(354, b"DATA\r\n")

    def closed(self):
        """True once the server has closed the connection."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.file.close()
        self.sock.close()


def send_message(smtp, data: bytes, sender="alice@example.com", to=("bob@example.com",)):
    return smtp.sendmail(sender, list(to), data)


def delivered_data(upstream) -> bytes:
    """The data of the first message the upstream received (waits for it)."""
    return upstream.wait_received(1)[0].data


MESSAGE = (b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: hello\r\n\r\n"
           b"Hello Bob.\r\n.a line that starts with a dot\r\n..two dots\r\nBye.\r\n")


def child_environment(env) -> dict:
    """The environment for a dispatch.py process: this one's without any RELAY_,
    UPSTREAM_ or DISPATCH_ variable, then `env`."""
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("RELAY_", "UPSTREAM_", "DISPATCH_"))}
    child_env.update(env or {})
    return child_env


class RelayProcess:
    """A real `python dispatch.py` process, its log in a file."""

    def __init__(self, env, tmp_path, args=(), wait=True, port=None):
        self.env = env
        self.port = port or int(env["RELAY_PORT"])
        self.log_path = tmp_path / f"dispatch-{self.port}-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(DISPATCH), *args],
                                     env=child_environment(env),
                                     stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     stdin=subprocess.DEVNULL)
        if wait:
            wait_for(self.ready, 15, "the relay to greet")

    def ready(self):
        if self.proc.poll() is not None:
            pytest.fail(f"dispatch.py exited {self.proc.returncode}: {self.log()}")
        return accepting(self.port, greeting=True)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=30):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


@pytest.fixture
def run_relay(tmp_path):
    processes = []

    def start(env, args=(), wait=True, port=None):
        process = RelayProcess(env, tmp_path, args, wait, port)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


def run_cli(*args, env=None, input=None, timeout=30):
    """Run dispatch.py to completion: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(DISPATCH), *args], env=child_environment(env),
                          input=input, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


# ===========================================================================
# Helpers for durability, metrics and TLS tests
# ===========================================================================


# Issue 4, "Never lose an accepted message": the spool, delivery failures,
# the limits and the drain (SPEC sections 1 and 3).


# ---------------------------------------------------------------------------
# Helpers: tokens that identify each message, a spool listing, upstream hooks
# ---------------------------------------------------------------------------

TOKEN = re.compile(rb"X-Token: (\S+)")


def token_message(token: str) -> bytes:
    return (f"From: app@example.com\r\nTo: bob@example.com\r\nSubject: {token}\r\n"
            f"X-Token: {token}\r\n\r\nbody\r\n").encode()


def submit(smtp, token, to=("bob@example.com",)) -> str:
    """Send one message over a logged-in smtplib session; return its queue ID.

    Raises AssertionError unless the relay answered 250 to its end of data.
    """
    code, text = smtp.mail("app@example.com")
    assert code == 250, text
    for recipient in to:
        code, text = smtp.rcpt(recipient)
        assert code == 250, text
    code, text = smtp.data(token_message(token))
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[1]


def raw_message(raw, size, code):
    """MAIL, RCPT, DATA and a message of exactly `size` bytes; expect `code` at its end."""
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
    return raw.expect(code, b"x" * (size - 2) + b"\r\n.\r\n")


def token_of(data: bytes) -> str:
    return TOKEN.search(data).group(1).decode()


def tokens(upstream) -> list:
    """The tokens of the messages the upstream received, in the order received."""
    return [token_of(m.data) for m in list(upstream.received)]


def spooled(spool: Path) -> list:
    """The message files waiting in the spool (not tmp/ or failed/)."""
    return sorted(p.name for p in spool.iterdir() if p.is_file())


def hook(upstream, command, fn):
    """Run `fn(server, session, envelope, *args)` for `command` on new upstream
    connections; a reply it returns is used, None falls through to the default."""
    default = getattr(upstream.handler, "handle_" + command)

    async def handle(server, session, envelope, *args):
        reply = fn(server, session, envelope, *args)
        if reply is not None:
            return reply
        return await default(server, session, envelope, *args)

    setattr(upstream.handler, "handle_" + command, handle)


def drop_connection(server) -> str:
    """Close the upstream side at once; the reply returned is never sent."""
    server.transport.abort()
    return "554 5.0.0 this reply is never sent"


def log_text(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def gaps(times):
    return [later - earlier for earlier, later in zip(times, times[1:])]


class AuthRefusingUpstream(Upstream):
    """An upstream that refuses the relay's AUTH (535) the first `refusals` times,
    as a provider does until the rotated password is in place; records each try."""

    def __init__(self, refusals, **kwargs):
        self.refusals = refusals
        self.auth_times = []
        super().__init__(**kwargs)

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.auth_times.append(time.monotonic())
        if len(self.auth_times) <= self.refusals:
            # handled=False: aiosmtpd itself answers "535 5.7.8 ... invalid".
            return AuthResult(success=False, handled=False)
        return super().authenticate(server, session, envelope, mechanism, auth_data)


@pytest.fixture
def spool(tmp_path):
    return tmp_path / "spool"


# Health, metrics (SPEC section 5) and the pipelined flush (SPEC section 3, RFC 2920).
#
# Everything runs on real sockets on 127.0.0.1: an in-process relay (or a real
# `dispatch.py` process), aiosmtpd as the upstream, HTTP for /healthz and
# /metrics, parsed as strictly as Prometheus parses its text format 0.0.4.


# ---------------------------------------------------------------------------
# A strict parser for the Prometheus text exposition format (version 0.0.4)
# ---------------------------------------------------------------------------

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN")
BLANKS = re.compile(r"[ \t]+")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


@dataclass
class Family:
    name: str
    type: str = None
    help: str = None
    samples: dict = field(default_factory=dict)   # (sample name, labels) -> value


class ExpositionError(AssertionError):
    pass


def _unescape(text, allowed, number, line):
    out, chars = [], iter(text)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, "")
        if escaped not in allowed:
            raise ExpositionError(f"line {number}: bad escape \\{escaped}: {line!r}")
        out.append(allowed[escaped])
    return "".join(out)


def _labels(line, pos, number):
    """Parse `{name="value",...}` from line[pos]; return (labels, position after it)."""
    labels = {}
    pos += 1
    while True:
        if line[pos:pos + 1] == "}":
            return labels, pos + 1
        match = LABEL_NAME.match(line, pos)
        if not match or line[match.end():match.end() + 2] != '="':
            raise ExpositionError(f"line {number}: bad label at column {pos}: {line!r}")
        name = match.group()
        if name.startswith("__") or name in labels:
            raise ExpositionError(f"line {number}: reserved or repeated label {name}: {line!r}")
        pos = match.end() + 2
        raw = []
        while True:
            if pos >= len(line):
                raise ExpositionError(f"line {number}: unterminated label value: {line!r}")
            char = line[pos]
            if char == '"':
                break
            if char == "\\":
                raw.append(line[pos:pos + 2])
                pos += 2
            else:
                raw.append(char)
                pos += 1
        labels[name] = _unescape("".join(raw), {"\\": "\\", '"': '"', "n": "\n"}, number, line)
        pos += 1
        if line[pos:pos + 1] == ",":
            pos += 1
        elif line[pos:pos + 1] != "}":
            raise ExpositionError(f"line {number}: expected , or }} after a label: {line!r}")


def parse_exposition(text):
    """Parse a /metrics body as Prometheus does, failing on anything it would reject.

    Also holds Dispatch to the conventions the brief asks for: every sample's
    metric has `# HELP` and `# TYPE` before it, and counters end in `_total`.
    Returns {family name: Family}.
    """
    if not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a line feed")
    families = {}
    finished = set()
    current = None

    def enter(name, number, line):
        nonlocal current
        if name != current:
            if name in finished:
                raise ExpositionError(f"line {number}: lines of {name} are not one group")
            if current is not None:
                finished.add(current)
            current = name
        return families.setdefault(name, Family(name))

    for number, line in enumerate(text[:-1].split("\n"), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = BLANKS.split(line.rstrip(" \t"), 3) if line.startswith("# ") else []
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                if not METRIC_NAME.fullmatch(parts[2]):
                    raise ExpositionError(f"line {number}: bad metric name: {line!r}")
                family = enter(parts[2], number, line)
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "HELP":
                    if family.help is not None:
                        raise ExpositionError(f"line {number}: second HELP: {line!r}")
                    family.help = _unescape(rest, {"\\": "\\", "n": "\n"}, number, line)
                else:
                    if family.type is not None or family.samples:
                        raise ExpositionError(f"line {number}: TYPE repeated or late: {line!r}")
                    if rest not in TYPES:
                        raise ExpositionError(f"line {number}: unknown type: {line!r}")
                    family.type = rest
            continue          # any other comment
        match = METRIC_NAME.match(line)
        if not match:
            raise ExpositionError(f"line {number}: bad metric name: {line!r}")
        name, pos = match.group(), match.end()
        labels = {}
        if line[pos:pos + 1] == "{":
            labels, pos = _labels(line, pos, number)
        fields = BLANKS.split(line[pos:].strip(" \t"))
        if not BLANKS.match(line, pos) or len(fields) not in (1, 2):
            raise ExpositionError(f"line {number}: expected ' value [timestamp]': {line!r}")
        if not FLOAT.fullmatch(fields[0]) or (len(fields) == 2 and
                                              not re.fullmatch(r"-?\d+", fields[1])):
            raise ExpositionError(f"line {number}: bad value or timestamp: {line!r}")
        value = float(fields[0].replace("Inf", "inf"))
        candidates = [name] + [name[:-len(s)] for s in ("_bucket", "_sum", "_count")
                               if name.endswith(s)]
        family = next((families[c] for c in candidates if c in families
                       and (c == name or name[len(c):] in SUFFIXES.get(families[c].type, ()))),
                      None)
        if family is None or family.type is None or family.help is None:
            raise ExpositionError(f"line {number}: sample without HELP and TYPE before it: "
                                  f"{line!r}")
        enter(family.name, number, line)
        key = (name, tuple(sorted(labels.items())))
        if key in family.samples:
            raise ExpositionError(f"line {number}: repeated sample: {line!r}")
        if family.type == "counter":
            if not name.endswith("_total"):
                raise ExpositionError(f"line {number}: a counter's name ends in _total: {line!r}")
            if math.isnan(value) or value < 0:
                raise ExpositionError(f"line {number}: a counter is never negative: {line!r}")
        family.samples[key] = value
    return families


# ---------------------------------------------------------------------------
# Helpers: HTTP, scraping, a scriptable upstream, a recording proxy
# ---------------------------------------------------------------------------

SPEC_COUNTERS = ("dispatch_messages_accepted_total", "dispatch_messages_sent_total",
                 "dispatch_messages_deferred_total", "dispatch_messages_failed_total",
                 "dispatch_messages_refused_total", "dispatch_auth_failures_total",
                 "dispatch_flush_failures_total")
SPEC_GAUGES = ("dispatch_queue_messages", "dispatch_queue_bytes",
               "dispatch_queue_oldest_age_seconds", "dispatch_last_flush_timestamp_seconds",
               "dispatch_last_flush_duration_seconds", "dispatch_sessions_open")


def http_get(port, path, host="127.0.0.1"):
    """(status, content type, body) of a real HTTP GET."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return (response.status, response.getheader("Content-Type", ""),
                response.read().decode("utf-8"))
    finally:
        connection.close()


class Scrape(dict):
    """Parsed /metrics: {family name: Family}; `scrape["name"]` is an unlabelled sample."""

    def value(self, name, **labels):
        return super().__getitem__(name).samples[(name, tuple(sorted(labels.items())))]

    def __getitem__(self, name):
        return self.value(name)


def scrape(port, host="127.0.0.1"):
    status, kind, body = http_get(port, "/metrics", host)
    assert status == 200, body
    assert kind.split(";")[0].strip() == "text/plain" and "version=0.0.4" in kind, kind
    return Scrape(parse_exposition(body))


def metrics_port(relay):
    return relay.metrics_server.server_address[1]


def relay_scrape(relay):
    return scrape(metrics_port(relay))


def healthz(relay_or_port, host="127.0.0.1"):
    port = relay_or_port if isinstance(relay_or_port, int) else metrics_port(relay_or_port)
    status, kind, body = http_get(port, "/healthz", host)
    return status, body


SILENT = object()      # drop the connection instead of replying


class Script:
    """Make the aiosmtpd upstream misbehave once for a given sender (at MAIL), recipient
    (at RCPT) or subject (at the end of data): answer `reply` (None: as usual), then
    maybe close the connection; `SILENT` closes it without any reply.  Each rule is
    used once, so a retry on a new connection goes through."""

    def __init__(self, upstream):
        self.mail, self.rcpt, self.data = {}, {}, {}
        handler = upstream.handler
        handler.handle_MAIL = self._hook(handler.handle_MAIL, self.mail,
                                         lambda envelope, args: args[0])
        handler.handle_RCPT = self._hook(handler.handle_RCPT, self.rcpt,
                                         lambda envelope, args: args[0])
        handler.handle_DATA = self._hook(handler.handle_DATA, self.data,
                                         lambda envelope, args: subject(envelope.original_content))

    def on_mail(self, sender, reply=None, close=False):
        self.mail[sender] = (reply, close)

    def on_rcpt(self, recipient, reply=None, close=False):
        self.rcpt[recipient] = (reply, close)

    def on_data(self, subject_text, reply=None, close=False):
        self.data[subject_text] = (reply, close)

    @staticmethod
    def _hook(original, rules, key):
        async def hook(server, session, envelope, *args):
            rule = rules.pop(key(envelope, args), None)
            if rule is None:
                return await original(server, session, envelope, *args)
            reply, close = rule
            if reply is SILENT:
                server.transport.close()
                return "250 never sent: the connection is closed"
            if reply is None:
                reply = await original(server, session, envelope, *args)
            if not close:
                return reply
            # Hang up right after this reply, before reading anything pipelined after it.
            await server.push(reply)
            server.transport.close()
            return "250 never sent: the connection is closed"
        return hook


def subject(data):
    match = re.search(rb"(?m)^Subject: (.*?)\r?$", data or b"")
    return match.group(1).decode() if match else None


def subjects(upstream):
    return [subject(m.data) for m in upstream.received]


def queue_mail(relay, *messages):
    """Send (subject, recipients) pairs through the relay, sender s<subject>@example.com."""
    with client(relay) as smtp:
        for name, recipients in messages:
            send_message(smtp, b"Subject: %s\r\n\r\nbody of %s\r\n" % (name.encode(),
                                                                        name.encode()),
                         sender=f"s-{name}@example.com", to=recipients)
    assert len(relay.queue) >= len(messages)


def batch(*names):
    return [(name, ["rcpt@example.com"]) for name in names]


class RecordingProxy:
    """A TCP proxy in front of the upstream that records every read from the relay,
    one list of chunks per connection: the writes the relay made, as they arrived."""

    def __init__(self, target_port):
        self.connections = []
        proxy = self

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self):
                chunks = []
                proxy.connections.append(chunks)
                with socket.create_connection(("127.0.0.1", target_port), timeout=10) as far:
                    back = threading.Thread(target=self.copy, args=(far, self.request),
                                            daemon=True)
                    back.start()
                    self.copy(self.request, far, chunks)
                    back.join(10)

            @staticmethod
            def copy(source, target, chunks=None):
                try:
                    while True:
                        data = source.recv(65536)
                        if not data:
                            break
                        if chunks is not None:
                            chunks.append(data)
                        target.sendall(data)
                except OSError:
                    pass
                try:
                    target.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Pipe)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metrics_relay(make_relay):
    """An in-process relay with its metrics port on, flushed by hand."""
    def make(upstream_port=None, **overrides):
        overrides.setdefault("DISPATCH_INTERVAL", 3600)
        return make_relay(upstream_port, DISPATCH_METRICS_PORT=free_port(), **overrides)
    return make


@pytest.fixture(params=[True, False], ids=["pipelining", "no-pipelining"])
def provider(request, make_upstream):
    """The upstream, with and without PIPELINING: every outcome must be the same."""
    return make_upstream(pipelining=request.param)


def assert_monotonic(before, after):
    """Counters never go down while the process lives."""
    for name, family in before.items():
        if family.type == "counter":
            for key, value in family.samples.items():
                assert dict.get(after, name).samples.get(key, 0) >= value, (key, value)


# Tests for TLS (issue 5): STARTTLS and implicit TLS on the relay, TLS
# required before AUTH, strict TLS to the upstream, and bad certificates at
# start-up.
#
# Certificates are made once per module in a temporary folder: a test CA, a
# server certificate for localhost/127.0.0.1 signed by it, an unrelated CA with
# its own localhost certificate, a certificate of the test CA for another host
# name, a key that matches none of them, and a key with a passphrase. Every
# handshake is real, on 127.0.0.1, and the clients verify the relay against the
# test CA.


# ---------------------------------------------------------------------------
# Certificates and TLS helpers
# ---------------------------------------------------------------------------


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(common_name, key, issuer=None, names=(), ca=False):
    """A certificate for `key`, signed by `issuer` = (cert, key), or self-signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer or (None, key)
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address(name)) if name[0].isdigit() else x509.DNSName(name)
            for name in names]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, *items, password=None):
    chunks = []
    for item in items:
        if isinstance(item, x509.Certificate):
            chunks.append(item.public_bytes(serialization.Encoding.PEM))
        else:
            encryption = (serialization.BestAvailableEncryption(password) if password
                          else serialization.NoEncryption())
            chunks.append(item.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8, encryption))
    path.write_bytes(b"".join(chunks))
    return str(path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """PEM files: ca, cert/key (localhost, 127.0.0.1), other_ca with other_cert/other_key,
    wrong_name_cert/wrong_name_key (the test CA, another host), wrong_key, encrypted_key."""
    folder = tmp_path_factory.mktemp("certs")
    ca_key, other_ca_key = _new_key(), _new_key()
    ca = _certificate("Dispatch Test CA", ca_key, ca=True)
    other_ca = _certificate("Unrelated Test CA", other_ca_key, ca=True)
    key, other_key, wrong_name_key = _new_key(), _new_key(), _new_key()
    names = ("localhost", "127.0.0.1")
    cert = _certificate("localhost", key, (ca, ca_key), names)
    return SimpleNamespace(
        folder=folder,
        ca=_write(folder / "ca.pem", ca),
        cert=_write(folder / "cert.pem", cert),
        key=_write(folder / "key.pem", key),
        other_ca=_write(folder / "other-ca.pem", other_ca),
        other_cert=_write(folder / "other-cert.pem",
                          _certificate("localhost", other_key, (other_ca, other_ca_key), names)),
        other_key=_write(folder / "other-key.pem", other_key),
        wrong_name_cert=_write(folder / "wrong-name-cert.pem", _certificate(
            "mail.example.com", wrong_name_key, (ca, ca_key), ("mail.example.com",))),
        wrong_name_key=_write(folder / "wrong-name-key.pem", wrong_name_key),
        wrong_key=_write(folder / "wrong-key.pem", _new_key()),
        encrypted_key=_write(folder / "encrypted-key.pem", key, password=b"passphrase"),
    )


def tls_env(certs, **overrides):
    """make_relay overrides for a relay with the test certificate."""
    return dict({"RELAY_TLS_CERT": certs.cert, "RELAY_TLS_KEY": certs.key}, **overrides)


def client_context(certs, ca=None):
    """What a careful client does: verify the relay against the test CA."""
    return ssl.create_default_context(cafile=ca or certs.ca)


def server_context(certs, cert=None, key=None):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert or certs.cert, key or certs.key)
    return context


def read_reply(sock):
    """(code, text) of one reply, read a byte at a time so that nothing after it
    is consumed: the bytes that follow may belong to a TLS handshake."""
    lines, line = [], b""
    while True:
        byte = sock.recv(1)
        if not byte:
            return None, "\n".join(lines)
        line += byte
        if line.endswith(b"\n"):
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)
            line = b""


def expect(sock, code, command=None):
    if command is not None:
        sock.sendall(command)
    got, text = read_reply(sock)
    assert got == code, f"expected {code}, got {text!r}"
    return text


def ehlo_keywords(text):
    return [line[4:] for line in text.splitlines()[1:]]


def connect_starttls(port, certs, server_hostname="localhost"):
    """A raw client: EHLO, STARTTLS, the verified handshake; the TLS socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    expect(sock, 220)
    expect(sock, 250, b"EHLO client.test\r\n")
    expect(sock, 220, b"STARTTLS\r\n")
    return client_context(certs).wrap_socket(sock, server_hostname=server_hostname)


def tls_client(relay, certs):
    """smtplib over STARTTLS, verifying the relay's certificate against the test CA,
    logged in."""
    smtp = smtplib.SMTP("localhost", relay.port, local_hostname="client.test", timeout=10)
    smtp.starttls(context=client_context(certs))
    smtp.login(USER, PASSWORD)
    return smtp


# ===========================================================================
# 1. Configuration and command line
# ===========================================================================


@pytest.mark.parametrize("change, variable", [
    ({"RELAY_USERNAME": None}, "RELAY_USERNAME"),
    ({"RELAY_PASSWORD": None}, "RELAY_PASSWORD"),
    ({"UPSTREAM_HOST": None}, "UPSTREAM_HOST"),
    ({"RELAY_PASSWORD": "plain-text-password"}, "RELAY_PASSWORD"),
    ({"RELAY_PORT": "twenty-five"}, "RELAY_PORT"),
    ({"RELAY_PORT": "70000"}, "RELAY_PORT"),
    ({"UPSTREAM_PORT": "587x"}, "UPSTREAM_PORT"),
    ({"DISPATCH_INTERVAL": "soon"}, "DISPATCH_INTERVAL"),
    ({"DISPATCH_INTERVAL": "-1"}, "DISPATCH_INTERVAL"),
    ({"UPSTREAM_TLS": "ssl"}, "UPSTREAM_TLS"),
    ({"UPSTREAM_TLS_VERIFY": "maybe"}, "UPSTREAM_TLS_VERIFY"),
    ({"RELAY_REQUIRE_TLS": "1"}, "RELAY_REQUIRE_TLS"),
    ({"RELAY_TLS_CERT": "/nonexistent/cert.pem", "RELAY_TLS_KEY": "/nonexistent/key.pem"},
     "RELAY_TLS_CERT"),
    ({"UPSTREAM_CA_FILE": "/nonexistent/ca.pem"}, "UPSTREAM_CA_FILE"),
    ({"RELAY_MAX_SIZE": "10MB"}, "RELAY_MAX_SIZE"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"RELAY_PASSWORD": "$2b$99$" + "a" * 53}, "RELAY_PASSWORD"),     # no such bcrypt cost
    ({"DISPATCH_SPOOL": "/dev/null/spool"}, "DISPATCH_SPOOL"),
])
def test_bad_configuration_stops_with_one_line_naming_the_variable(change, variable):
    env = relay_env(2)
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    status, out, err = run_cli(env=env)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert variable in lines[0] and "Traceback" not in err


def test_defaults_follow_the_spec():
    config = dispatch.Config.from_env({"RELAY_USERNAME": "u", "RELAY_PASSWORD": PASSWORD_HASH,
                                       "UPSTREAM_HOST": "smtp.example.com"})
    assert (config.interval, config.port, config.bind, config.upstream_port) == (60, 25,
                                                                                 "0.0.0.0", 587)
    assert (config.upstream_tls, config.upstream_tls_verify, config.require_tls) == (
        "starttls", True, False)
    assert (config.max_size, config.max_recipients, config.timeout) == (10485760, 100, 300)
    assert (config.max_connections, config.max_queue, config.max_age) == (100, 268435456,
                                                                           432000)
    assert (config.retry_max, config.drain_timeout, config.metrics_port) == (3600, 30, None)
    assert config.relay_host == socket.getfqdn()
    port_465 = dispatch.Config.from_env({"RELAY_USERNAME": "u", "RELAY_PASSWORD": PASSWORD_HASH,
                                         "UPSTREAM_HOST": "h", "UPSTREAM_PORT": "465"})
    assert port_465.upstream_tls == "tls"


def test_decimal_interval_is_allowed():
    env = relay_env(2)
    env["DISPATCH_INTERVAL"] = "0.5"
    assert dispatch.Config.from_env(env).interval == 0.5


def test_help_needs_no_configuration_and_lists_the_variables():
    status, out, err = run_cli("--help")
    assert status == 0
    for name in ("RELAY_PASSWORD", "UPSTREAM_HOST", "DISPATCH_INTERVAL", "hash-password",
                 "--env-file", "DISPATCH_SPOOL"):
        assert name in out


def test_hash_password_reads_stdin_and_prints_a_hash_bcrypt_accepts():
    status, out, err = run_cli("hash-password", input="correct horse\n")
    assert status == 0, err
    assert bcrypt.checkpw(b"correct horse", out.strip().encode())


def test_hash_password_refuses_an_empty_password():
    status, out, err = run_cli("hash-password", input="\n")
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1


def ehlo_host_name(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        return smtp.ehlo()[1].decode().splitlines()[0]


def test_env_file_supplies_variables_the_environment_lacks(tmp_path, upstream, run_relay):
    env = relay_env(upstream.port)
    port = int(env.pop("RELAY_PORT"))
    del env["RELAY_HOST"]
    env_file = tmp_path / "relay.env"
    env_file.write_text(f"# comment\nexport RELAY_PORT={port}\nRELAY_HOST='from-file.test'\n")
    process = run_relay(env, args=["--env-file", str(env_file)], port=port)
    assert ehlo_host_name(process.port) == "from-file.test"


def test_the_environment_wins_over_the_env_file(tmp_path, upstream, run_relay):
    env = relay_env(upstream.port, RELAY_HOST="from-environment.test")
    file_port = free_port()
    env_file = tmp_path / "relay.env"
    env_file.write_text(f"RELAY_PORT={file_port}\nRELAY_HOST=from-file.test\n")
    process = run_relay(env, args=["--env-file", str(env_file)])
    assert ehlo_host_name(process.port) == "from-environment.test"
    assert not accepting(file_port)


@pytest.mark.parametrize("variable", ["RELAY_PORT", "DISPATCH_METRICS_PORT"])
def test_a_port_in_use_stops_start_up_with_one_line_naming_its_variable(variable):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = dict(relay_env(2), **{variable: str(taken.getsockname()[1])})
        status, out, err = run_cli(env=env)
    assert status == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "configuration error" in line] == [
        line for line in err.splitlines() if variable in line]
    assert f"{variable}: cannot listen" in err


def test_unreadable_env_file_is_a_one_line_error(tmp_path):
    status, out, err = run_cli("--env-file", str(tmp_path / "missing.env"),
                               env=relay_env(2))
    assert status == 2 and "--env-file" in err and len(err.strip().splitlines()) == 1


def test_example_env_is_a_valid_configuration():
    environ = {}
    dispatch.load_env_file(str(HERE / "example.env"), environ)
    config = dispatch.Config.from_env(environ)
    assert bcrypt.checkpw(b"secret", config.password_hash)
    assert config.port == 2525 and config.upstream_tls == "none"


@pytest.mark.parametrize("change, variable", [
    ({"RELAY_TLS_CERT": "{folder}"}, "RELAY_TLS_CERT"),                 # cannot be read
    ({"RELAY_TLS_CERT": "{folder}/garbage.pem"}, "RELAY_TLS_CERT"),     # not PEM
    ({"RELAY_TLS_CERT": "{folder}/broken.pem"}, "RELAY_TLS_CERT"),      # a broken PEM
    ({"RELAY_TLS_KEY": "{wrong_key}"}, "RELAY_TLS_KEY"),                # does not match
    ({"RELAY_TLS_KEY": "{cert}"}, "RELAY_TLS_KEY"),                     # holds no key
    ({"RELAY_TLS_KEY": "{encrypted_key}"}, "RELAY_TLS_KEY"),            # needs a passphrase
    ({"RELAY_TLS_KEY": None}, "RELAY_TLS_KEY"),
    ({"RELAY_TLS_CERT": None, "RELAY_TLS_KEY": None, "RELAY_TLS_PORT": "4650"},
     "RELAY_TLS_PORT"),
    ({"UPSTREAM_CA_FILE": "{folder}/garbage.pem"}, "UPSTREAM_CA_FILE"),
], ids=["unreadable", "not-pem", "broken-pem", "mismatch", "no-key", "encrypted-key", "key-missing",
        "tls-port-without-cert", "bad-ca-file"])
def test_a_bad_certificate_stops_start_up_with_one_line(certs, change, variable):
    (certs.folder / "garbage.pem").write_text("not a certificate\n")
    (certs.folder / "broken.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    env = relay_env(2, RELAY_TLS_CERT=certs.cert, RELAY_TLS_KEY=certs.key)
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value.format(**vars(certs))
    status, out, err = run_cli(env=env, timeout=10)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert variable in lines[0] and "Traceback" not in err and "(_ssl.c" not in err


# ===========================================================================
# 2. The client session
# ===========================================================================


def test_greeting_and_ehlo_advertise_the_extensions(relay):
    raw = Raw(relay.port, greeting=False)
    assert raw.expect(220) == "220 relay.test ESMTP"
    text = raw.expect(250, b"EHLO client.test\r\n")
    lines = [line[4:] for line in text.splitlines()]
    assert lines[0] == "relay.test"
    for extension in ("PIPELINING", f"SIZE {relay.config.max_size}", "8BITMIME", "SMTPUTF8",
                      "ENHANCEDSTATUSCODES", "AUTH PLAIN LOGIN"):
        assert extension in lines
    assert "STARTTLS" not in lines       # no certificate configured


def test_helo_works_and_ehlo_without_a_name_is_a_syntax_error(relay):
    raw = Raw(relay.port)
    raw.expect(501, b"EHLO\r\n")
    assert raw.expect(250, b"HELO client.test\r\n") == "250 relay.test"


def test_mail_without_auth_is_refused_never_an_open_relay(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    assert raw.expect(530, b"MAIL FROM:<a@example.com>\r\n").startswith("530 5.7.0")
    raw.expect(503, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(503, b"DATA\r\n")
    assert len(relay.queue) == 0


def test_auth_plain_with_initial_response(relay):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")


def test_auth_plain_without_initial_response(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    assert raw.expect(334, b"AUTH PLAIN\r\n") == "334 "
    raw.expect(235, base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n")


def test_auth_plain_with_the_username_as_authorization_identity(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(235, auth_plain(identity=USER))


def test_auth_plain_with_another_authorization_identity_is_refused(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(535, auth_plain(identity="admin"))


def test_auth_login(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    assert raw.expect(334, b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6"
    assert raw.expect(334, base64.b64encode(USER.encode()) + b"\r\n") == "334 UGFzc3dvcmQ6"
    raw.expect(235, base64.b64encode(PASSWORD.encode()) + b"\r\n")


def test_smtplib_login_works(relay):
    with client(relay) as smtp:
        assert smtp.noop()[0] == 250


def test_wrong_password_is_535_and_mail_is_still_refused(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    text = raw.expect(535, auth_plain(password="wrong"))
    assert text.startswith("535 5.7.8")
    raw.expect(530, b"MAIL FROM:<a@example.com>\r\n")


def test_wrong_username_is_535(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(535, auth_plain(user="other"))


def test_auth_cancelled_with_star_is_501_and_mail_still_needs_auth(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(334, b"AUTH LOGIN\r\n")
    raw.expect(501, b"*\r\n")
    raw.expect(530, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(235, auth_plain())


def test_bad_base64_is_501_5_5_2(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    assert raw.expect(501, b"AUTH PLAIN not*base64!\r\n").startswith("501 5.5.2")
    raw.expect(250, b"NOOP\r\n")


@pytest.mark.parametrize("response", [b"no-nul-at-all", b"\0only-one-nul", b"a\0b\0c\0d"])
def test_a_plain_response_without_exactly_two_nuls_is_501_after_a_334_too(relay, response):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(334, b"AUTH PLAIN\r\n")
    assert raw.expect(501, base64.b64encode(response) + b"\r\n").startswith("501 5.5.2")
    raw.expect(530, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(235, auth_plain())


def test_auth_twice_is_503(relay):
    raw = Raw(relay.port)
    raw.login()
    assert raw.expect(503, b"AUTH PLAIN AGFwcABz\r\n").startswith("503 5.5.1")


def test_unknown_auth_mechanism_is_504(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(504, b"AUTH CRAM-MD5\r\n")


def test_three_failed_auths_close_the_session_with_421(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    bad = auth_plain(password="wrong")
    raw.expect(535, bad)
    raw.expect(501, b"AUTH PLAIN ***\r\n")
    raw.expect(334, b"AUTH LOGIN\r\n")
    raw.expect(501, b"*\r\n")                 # a cancel is a failure too
    assert raw.expect(421).startswith("421 4.7.0")
    assert raw.closed()
    with client(relay) as smtp:        # the next session is unaffected
        assert smtp.noop()[0] == 250


def test_the_password_is_checked_with_bcrypt_once_then_remembered(relay, monkeypatch):
    calls = []
    real = dispatch.bcrypt.checkpw
    monkeypatch.setattr(dispatch.bcrypt, "checkpw", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        with client(relay):
            pass
    assert len(calls) == 1
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(535, auth_plain(password="wrong"))
    assert len(calls) == 2              # a wrong password always pays bcrypt


def test_a_message_is_queued_with_a_queue_id(relay, upstream):
    raw = Raw(relay.port)
    raw.start_data("alice@example.com", to=("bob@example.com",))
    text = raw.expect(250, b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert text.startswith("250 2.0.0 Ok: queued as ")
    queue_id = text.rsplit(" ", 1)[1]
    assert queue_id.isalnum()
    upstream.wait_received(1)


def test_null_sender_is_allowed(relay, upstream):
    with client(relay) as smtp:
        send_message(smtp, MESSAGE, sender="")
    assert upstream.wait_received(1)[0].sender == "<>"     # aiosmtpd's spelling of null


def test_commands_in_the_wrong_order_get_503(relay):
    raw = Raw(relay.port)
    raw.expect(503, b"AUTH PLAIN\r\n")         # before EHLO
    raw.login()
    raw.expect(503, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(503, b"DATA\r\n")
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(503, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(503, b"DATA\r\n")
    raw.expect(503, b"AUTH PLAIN AGFwcABz\r\n")


@pytest.mark.parametrize("command", [
    b"MAIL FROM:a@example.com", b"MAIL FROM:<a@example.com", b"MAIL TO:<a@example.com>",
    b"MAIL FROM:<not an address>", b"MAIL FROM:<no-at-sign>", b"MAIL",
    b"MAIL FROM:<a@example.com> SIZE=big", b"MAIL FROM:<a@example.com> BODY=9BIT",
])
def test_bad_mail_syntax_is_501(relay, command):
    raw = Raw(relay.port)
    raw.login()
    assert raw.expect(501, command + b"\r\n").startswith("501 5.5.4")
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")


def test_bad_rcpt_syntax_is_501(relay):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    for command in (b"RCPT TO:<>", b"RCPT TO:b@example.com", b"RCPT FROM:<b@example.com>"):
        assert raw.expect(501, command + b"\r\n").startswith("501 5.5.4")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")


def test_unknown_parameter_is_555(relay):
    raw = Raw(relay.port)
    raw.login()
    assert raw.expect(555, b"MAIL FROM:<a@example.com> FOO=bar\r\n").startswith("555 5.5.4")
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(555, b"RCPT TO:<b@example.com> NOTIFY=NEVER\r\n")


@pytest.mark.parametrize("size", ["\u00b2", "-1", "1e3", ""])
def test_a_size_that_is_not_ascii_digits_is_501_and_the_session_goes_on(relay, size):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(501, f"MAIL FROM:<a@example.com> SIZE={size}\r\n".encode())
    raw.expect(250, b"MAIL FROM:<a@example.com> SIZE=10\r\n")


def test_mail_parameters_size_body_smtputf8_auth_are_accepted(relay):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME SMTPUTF8 "
                    b"AUTH=<a@example.com>\r\n")


def test_declared_size_over_the_limit_is_552(make_relay):
    relay = make_relay(RELAY_MAX_SIZE=1000)
    raw = Raw(relay.port)
    raw.login()
    assert raw.expect(552, b"MAIL FROM:<a@example.com> SIZE=1001\r\n").startswith("552 5.3.4")
    raw.expect(250, b"MAIL FROM:<a@example.com> SIZE=1000\r\n")


def test_a_message_over_the_size_limit_is_read_to_its_end_and_refused(make_relay, upstream):
    relay = make_relay(RELAY_MAX_SIZE=1000)
    raw = Raw(relay.port)
    raw.start_data()
    raw.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 100)
    assert raw.expect(552, b".\r\n").startswith("552 5.3.4")
    # The session goes on: a small message is accepted.
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
    raw.expect(250, b"small\r\n.\r\n")
    assert [m.data for m in upstream.wait_received(1)] == [b"small\r\n"]


def test_too_many_recipients_is_452(make_relay, upstream):
    relay = make_relay(RELAY_MAX_RECIPIENTS=2)
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b1@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b2@example.com>\r\n")
    assert raw.expect(452, b"RCPT TO:<b3@example.com>\r\n").startswith("452 4.5.3")
    raw.expect(354, b"DATA\r\n")
    raw.expect(250, b"x\r\n.\r\n")
    assert upstream.wait_received(1)[0].recipients == ["b1@example.com", "b2@example.com"]


def test_rset_noop_vrfy_help_quit(relay):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RSET\r\n")
    raw.expect(503, b"RCPT TO:<b@example.com>\r\n")    # RSET ended the transaction
    raw.expect(250, b"NOOP\r\n")
    raw.expect(252, b"VRFY bob\r\n")
    raw.expect(214, b"HELP\r\n")
    raw.expect(221, b"QUIT\r\n")
    assert raw.closed()


def test_unknown_command_is_500_and_the_session_goes_on(relay):
    raw = Raw(relay.port)
    assert raw.expect(500, b"FROBNICATE now\r\n").startswith("500 5.5.2")
    raw.expect(500, b"\r\n")
    raw.expect(500, b"\xff\xfe\x00garbage\r\n")
    raw.expect(250, b"EHLO client.test\r\n")


def test_a_command_line_over_512_bytes_is_500(relay):
    raw = Raw(relay.port)
    raw.login()
    at_limit = b"NOOP " + b"x" * (512 - len(b"NOOP \r\n")) + b"\r\n"
    assert len(at_limit) == 512
    assert raw.expect(250, at_limit) == "250 2.0.0 Ok"
    assert raw.expect(500, at_limit[:-2] + b"x\r\n").startswith("500 5.5.2")     # 513
    line = b"MAIL FROM:<" + b"a" * 500 + b"@example.com>\r\n"
    assert raw.expect(500, line).startswith("500 5.5.2")
    raw.expect(500, b"NOOP " + b"x" * 20000 + b"\r\n")      # even past the AUTH limit
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")


def test_a_sasl_response_over_12288_bytes_is_500_and_the_session_goes_on(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(334, b"AUTH PLAIN\r\n")
    assert raw.expect(500, b"A" * 13000 + b"\r\n").startswith("500 5.5.2")
    raw.expect(235, auth_plain())


def test_an_auth_line_may_be_longer_than_512_bytes(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    long_token = base64.b64encode(b"\0" + USER.encode() + b"\0" + b"p" * 1000)
    raw.expect(535, b"AUTH PLAIN " + long_token + b"\r\n")   # refused for the password only


def test_an_auth_line_of_12288_bytes_is_taken_and_one_byte_more_is_500(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    # 9207 bytes encode to 12276 base64 characters, no padding; spaces fill the line.
    token = base64.b64encode(b"\0" + USER.encode() + b"\0" + b"p" * (9207 - 2 - len(USER)))
    at_limit = b"AUTH PLAIN " + token + b" "
    assert len(at_limit) == 12288
    raw.expect(535, at_limit + b"\r\n")           # read whole: refused for the password only
    raw.expect(500, at_limit + b" \r\n")
    raw.expect(334, b"AUTH PLAIN\r\n")            # the same limit for a SASL response
    assert len(token + b"    " * 3) == 12288
    raw.expect(535, token + b"    " * 3 + b"\r\n")


def test_pipelined_commands_in_one_packet_are_all_answered_in_order(relay, upstream):
    raw = Raw(relay.port)
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    raw.send(b"EHLO client.test\r\nAUTH PLAIN " + token + b"\r\nMAIL FROM:<a@example.com>\r\n"
             b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
    for code in (250, 235, 250, 250, 250, 354):
        raw.expect(code)
    raw.send(b"Subject: p\r\n\r\none\r\n.\r\nMAIL FROM:<a@example.com>\r\n"
             b"RCPT TO:<d@example.com>\r\nDATA\r\n")
    for code in (250, 250, 250, 354):
        raw.expect(code)
    raw.send(b"two\r\n.\r\nQUIT\r\n")
    raw.expect(250)
    raw.expect(221)
    got = upstream.wait_received(2)
    assert [m.recipients for m in got] == [["b@example.com", "c@example.com"],
                                           ["d@example.com"]]


def test_dot_stuffing_is_removed(relay, upstream):
    raw = Raw(relay.port)
    raw.start_data()
    raw.expect(250, b"..leading dot\r\nmiddle\r\n...\r\n.\r\n")
    assert delivered_data(upstream) == b".leading dot\r\nmiddle\r\n..\r\n"


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_only_crlf_dot_crlf_ends_the_data_so_smuggling_is_impossible(relay, upstream, smuggle):
    raw = Raw(relay.port)
    raw.start_data()
    raw.send(b"Subject: one\r\n\r\nfirst" + smuggle + b"MAIL FROM:<evil@example.com>\r\n"
             b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    text = raw.expect(250)
    assert "queued as" in text
    # Exactly one reply came for all of it: the next is NOOP's, not a smuggled MAIL's.
    assert raw.expect(250, b"NOOP\r\n") == "250 2.0.0 Ok"
    got = upstream.wait_received(1)
    wait_for(lambda: len(relay.queue) == 0, what="the relay to settle the message")
    assert len(upstream.received) == 1
    assert got[0].recipients == ["b@example.com"]
    # Every line reaches the upstream ended by CRLF: no bare CR or LF survives.
    data = got[0].data
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    assert b"MAIL FROM:<evil@example.com>" in data


def test_bare_line_ends_are_stored_as_crlf(relay, upstream):
    raw = Raw(relay.port)
    raw.start_data()
    raw.expect(250, b"a\nb\rc\r\n.\r\n")
    assert delivered_data(upstream) == b"a\r\nb\r\nc\r\n"


def test_an_empty_message_is_accepted(relay, upstream):
    raw = Raw(relay.port)
    raw.start_data()
    raw.expect(250, b".\r\n")
    upstream.wait_received(1)


def test_long_text_lines_are_data_not_errors(make_relay, make_upstream):
    upstream = make_upstream(long_lines=True)
    relay = make_relay(upstream_port=upstream.port)
    body = b"Subject: long\r\n\r\n" + b"z" * 200_000 + b"\r\n"
    raw = Raw(relay.port)
    raw.start_data()
    raw.expect(250, body + b".\r\n")
    assert upstream.wait_received(1)[0].data == body


def test_an_idle_client_gets_421_after_the_timeout(make_relay):
    relay = make_relay(RELAY_TIMEOUT="0.3")
    raw = Raw(relay.port)
    assert raw.expect(421).startswith("421 4.4.2")
    assert raw.closed()


def test_bad_clients_never_disturb_a_good_one(relay, upstream):
    garbage = Raw(relay.port)
    garbage.send(os.urandom(5000))
    half = Raw(relay.port)
    half.send(b"EHLO half-a-line")
    abrupt = Raw(relay.port)
    abrupt.login()
    abrupt.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\npartial")
    abrupt.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    abrupt.close()
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    assert upstream.wait_received(1)[0].data == MESSAGE
    half.send(b"\r\n")
    half.expect(250)


def test_non_ascii_address_needs_smtputf8(relay, upstream):
    raw = Raw(relay.port)
    raw.login()
    assert raw.expect(553, "MAIL FROM:<jös@example.com>\r\n".encode()).startswith("553 5.6.7")
    raw.expect(250, "MAIL FROM:<jös@example.com> SMTPUTF8\r\n".encode())
    raw.expect(250, "RCPT TO:<björn@exämple.com>\r\n".encode())
    raw.expect(354, b"DATA\r\n")
    raw.expect(250, "Subject: héllo\r\n\r\nç\r\n.\r\n".encode())
    got = upstream.wait_received(1)[0]
    assert got.sender == "jös@example.com" and "SMTPUTF8" in got.options


def test_the_listener_rebinds_at_once_after_kill_9(upstream, run_relay):
    env = relay_env(upstream.port)
    first = run_relay(env)
    held = Raw(first.port)              # a session open across the kill: its connection
    held.login()                        # keeps the port busy (FIN_WAIT/TIME_WAIT)
    first.signal(signal.SIGKILL)
    first.wait()
    try:
        second = run_relay(env)         # fails the test if dispatch.py cannot bind
        assert ehlo_host_name(second.port) == "relay.test"
    finally:
        held.close()


def test_past_the_queue_cap_mail_and_a_message_that_would_cross_it_get_452_4_3_1(
        make_relay, upstream):
    relay = make_relay(DISPATCH_MAX_QUEUE=1000, DISPATCH_INTERVAL=3600)
    raw = Raw(relay.port)
    raw.login()
    raw_message(raw, 600, 250)
    assert raw_message(raw, 600, 452).startswith("452 4.3.1")    # would cross the cap
    assert (len(relay.queue), relay.queue.bytes) == (1, 600)      # nothing queued touched
    raw_message(raw, 400, 250)                                    # exactly at the cap
    assert raw.expect(452, b"MAIL FROM:<a@example.com>\r\n").startswith("452 4.3.1")
    assert relay.flusher.flush()
    assert [len(m.data) for m in upstream.received] == [600, 400]
    raw_message(raw, 600, 250)                                    # room again


def test_a_session_past_relay_max_connections_gets_421_and_is_closed(make_relay):
    relay = make_relay(RELAY_MAX_CONNECTIONS=2)
    first, second = Raw(relay.port), Raw(relay.port)
    third = Raw(relay.port, greeting=False)
    assert third.expect(421).startswith("421 4.7.0")
    assert third.closed()
    first.expect(221, b"QUIT\r\n")
    first.close()
    wait_for(lambda: accepting(relay.port, greeting=True), what="a free session slot")
    second.expect(250, b"NOOP\r\n")


def test_a_client_silent_in_the_middle_of_data_times_out_and_nothing_is_queued(
        make_relay, upstream):
    relay = make_relay(RELAY_TIMEOUT="1", DISPATCH_INTERVAL=3600)
    raw = Raw(relay.port)
    raw.start_data()
    raw.send(b"Subject: half\r\n\r\nthe first half")
    assert raw.expect(421).startswith("421 4.4.2")
    assert raw.closed() and len(relay.queue) == 0


# ===========================================================================
# 2. The client session: STARTTLS, implicit TLS, cleartext
# ===========================================================================


def test_starttls_with_a_verifying_client_then_auth_and_mail_reach_the_upstream(
        make_relay, upstream, certs):
    relay = make_relay(**tls_env(certs))
    with tls_client(relay, certs) as smtp:
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        send_message(smtp, MESSAGE)
    assert upstream.wait_received(1)[0].data == MESSAGE


def test_ehlo_offers_starttls_and_hides_auth_until_tls_is_on(make_relay, certs):
    relay = make_relay(**tls_env(certs))
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    expect(sock, 220)
    before = ehlo_keywords(expect(sock, 250, b"EHLO client.test\r\n"))
    assert "STARTTLS" in before and not any(k.startswith("AUTH") for k in before)
    expect(sock, 220, b"STARTTLS\r\n")
    tls = client_context(certs).wrap_socket(sock, server_hostname="localhost")
    after = ehlo_keywords(expect(tls, 250, b"EHLO client.test\r\n"))
    assert "AUTH PLAIN LOGIN" in after and "STARTTLS" not in after
    assert set(before) - {"STARTTLS"} == set(after) - {"AUTH PLAIN LOGIN"}
    tls.close()


def test_auth_before_starttls_is_538_and_asks_for_no_password(make_relay, certs):
    relay = make_relay(**tls_env(certs))
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    expect(sock, 220)
    expect(sock, 250, b"EHLO client.test\r\n")
    # Three refusals: a 538 is not a failed password, so no lockout follows.
    for command in (auth_plain(), b"AUTH LOGIN\r\n", b"AUTH PLAIN\r\n"):
        assert expect(sock, 538, command).startswith("538 5.7.11 ")
    assert expect(sock, 530, b"MAIL FROM:<alice@example.com>\r\n").startswith("530 5.7.0")
    expect(sock, 220, b"STARTTLS\r\n")
    tls = client_context(certs).wrap_socket(sock, server_hostname="localhost")
    expect(tls, 250, b"EHLO client.test\r\n")
    expect(tls, 235, auth_plain())
    tls.close()
    assert len(relay.queue) == 0


@pytest.mark.parametrize("injected", [
    b"RSET\r\n",
    b"MAIL FROM:<x@y>\r\n",
    b"EHLO evil.test\r\n" + auth_plain(),
], ids=["rset", "mail", "ehlo-auth"])
def test_commands_pipelined_after_starttls_in_cleartext_are_never_run_inside_tls(
        make_relay, certs, injected):
    relay = make_relay(**tls_env(certs))
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    expect(sock, 220)
    expect(sock, 250, b"EHLO client.test\r\n")
    sock.sendall(b"STARTTLS\r\n" + injected)      # one packet, as an attacker would
    expect(sock, 220)
    tls = client_context(certs).wrap_socket(sock, server_hostname="localhost")
    first = expect(tls, 250, b"EHLO client.test\r\n")
    assert first.splitlines()[0] == "250-relay.test", first
    # The injected AUTH did not log the session in, and no reply is left over.
    expect(tls, 530, b"MAIL FROM:<alice@example.com>\r\n")
    assert expect(tls, 221, b"QUIT\r\n").startswith("221 ")
    tls.close()


def test_the_session_forgets_ehlo_and_auth_after_starttls(make_relay, certs):
    relay = make_relay(**tls_env(certs, RELAY_REQUIRE_TLS=0))
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    expect(sock, 220)
    before = ehlo_keywords(expect(sock, 250, b"EHLO client.test\r\n"))
    assert "AUTH PLAIN LOGIN" in before and "STARTTLS" in before   # TLS not required
    expect(sock, 235, auth_plain())
    expect(sock, 220, b"STARTTLS\r\n")
    tls = client_context(certs).wrap_socket(sock, server_hostname="localhost")
    expect(tls, 530, b"MAIL FROM:<alice@example.com>\r\n")   # not logged in any more
    expect(tls, 503, auth_plain())                 # EHLO forgotten too
    expect(tls, 250, b"EHLO client.test\r\n")
    expect(tls, 235, auth_plain())
    expect(tls, 250, b"MAIL FROM:<alice@example.com>\r\n")
    tls.close()


def test_starttls_twice_or_inside_a_transaction_is_503(make_relay, certs):
    relay = make_relay(**tls_env(certs, RELAY_REQUIRE_TLS=0))
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    expect(sock, 220)
    expect(sock, 250, b"EHLO client.test\r\n")
    expect(sock, 235, auth_plain())
    expect(sock, 250, b"MAIL FROM:<alice@example.com>\r\n")
    assert expect(sock, 503, b"STARTTLS\r\n").startswith("503 5.5.1 ")
    expect(sock, 501, b"STARTTLS now\r\n")
    expect(sock, 250, b"RSET\r\n")
    expect(sock, 220, b"STARTTLS\r\n")
    tls = client_context(certs).wrap_socket(sock, server_hostname="localhost")
    expect(tls, 250, b"EHLO client.test\r\n")
    assert expect(tls, 503, b"STARTTLS\r\n").startswith("503 5.5.1 ")
    expect(tls, 250, b"NOOP\r\n")          # still talking TLS: the 503 ended nothing
    tls.close()


def test_quit_inside_tls_ends_with_a_close_notify(make_relay, certs):
    relay = make_relay(**tls_env(certs))
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    expect(sock, 220)
    expect(sock, 250, b"EHLO client.test\r\n")
    expect(sock, 220, b"STARTTLS\r\n")
    # Strict: a connection cut without close_notify raises SSLEOFError here.
    tls = client_context(certs).wrap_socket(sock, server_hostname="localhost",
                                            suppress_ragged_eofs=False)
    expect(tls, 250, b"EHLO client.test\r\n")
    expect(tls, 221, b"QUIT\r\n")
    assert tls.recv(1) == b""
    tls.close()


def test_tls_older_than_1_2_is_refused(make_relay, certs):
    relay = make_relay(**tls_env(certs))
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    expect(sock, 220)
    expect(sock, 250, b"EHLO client.test\r\n")
    expect(sock, 220, b"STARTTLS\r\n")
    old = client_context(certs)
    old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):   # the relay's alert
        old.wrap_socket(sock, server_hostname="localhost")
    sock.close()


def read_to_eof(sock):
    """Read until the server closes (a TLS alert may come first); True then."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_a_failed_handshake_ends_that_session_only_and_is_logged(make_relay, upstream, certs,
                                                                   caplog):
    caplog.set_level("INFO", logger="dispatch")
    relay = make_relay(**tls_env(certs, RELAY_TLS_PORT=free_port()))
    tls_port = relay.listeners[1].server_address[1]
    # A session in the middle of a transaction, and a client silent on the implicit port.
    good = tls_client(relay, certs)
    good.mail("alice@example.com")
    silent = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    failed_clients = []
    for garbage in (b"this is not a TLS handshake\r\n\r\n",
                    b"\x16\x03\x01\x00\x04\xff\xff\xff\xff"):     # a broken ClientHello
        bad = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        expect(bad, 220)
        expect(bad, 250, b"EHLO client.test\r\n")
        expect(bad, 220, b"STARTTLS\r\n")
        implicit = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
        for sock in (bad, implicit):
            failed_clients.append("127.0.0.1:%d" % sock.getsockname()[1])
            sock.sendall(garbage)
            assert read_to_eof(sock)
            sock.close()
    good.rcpt("bob@example.com")
    good.data(MESSAGE)
    good.quit()
    with smtplib.SMTP_SSL("localhost", tls_port, context=client_context(certs),
                          timeout=10) as smtp:
        smtp.login(USER, PASSWORD)
    assert upstream.wait_received(1)[0].data == MESSAGE
    silent.close()
    for peer in failed_clients:      # the operator sees which client could not talk TLS
        assert f"TLS handshake failed: client={peer}, " in log_text(caplog)


def test_relay_timeout_holds_inside_tls_and_during_the_handshake(make_relay, certs):
    relay = make_relay(**tls_env(certs, RELAY_TLS_PORT=free_port(), RELAY_TIMEOUT=1))
    tls_port = relay.listeners[1].server_address[1]
    silent = socket.create_connection(("127.0.0.1", tls_port), timeout=10)   # no ClientHello
    idle = connect_starttls(relay.port, certs)
    expect(idle, 250, b"EHLO client.test\r\n")
    assert expect(idle, 421).startswith("421 4.4.2 ")        # said inside TLS
    assert read_to_eof(silent)
    wait_for(lambda: relay.connections == 0, what="both session slots to be free")
    idle.close()
    silent.close()


def test_the_implicit_tls_listener_speaks_tls_from_the_first_byte(make_relay, upstream, certs):
    relay = make_relay(**tls_env(certs, RELAY_TLS_PORT=free_port()))
    tls_port = relay.listeners[1].server_address[1]
    with smtplib.SMTP_SSL("localhost", tls_port, local_hostname="client.test",
                          context=client_context(certs), timeout=10) as smtp:
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        keywords = smtp.ehlo()[1].decode().splitlines()[1:]
        assert "AUTH PLAIN LOGIN" in keywords and "STARTTLS" not in keywords
        assert smtp.docmd("STARTTLS")[0] == 503
        smtp.login(USER, PASSWORD)
        send_message(smtp, MESSAGE)
    assert upstream.wait_received(1)[0].data == MESSAGE
    # Cleartext SMTP on that port gets no greeting: the relay waits for a handshake.
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as plain:
        plain.sendall(b"EHLO client.test\r\n")
        try:
            answer = plain.recv(4096)      # a TLS alert, or nothing
        except ConnectionResetError:
            answer = b""
        assert not answer.startswith(b"220")


def test_a_real_process_offers_starttls_and_implicit_tls_with_one_certificate(
        upstream, run_relay, certs):
    env = relay_env(upstream.port, RELAY_TLS_CERT=certs.cert, RELAY_TLS_KEY=certs.key,
                    RELAY_TLS_PORT=free_port())
    process = run_relay(env)
    with smtplib.SMTP("localhost", process.port, timeout=10) as smtp:
        smtp.starttls(context=client_context(certs))
        smtp.login(USER, PASSWORD)
        send_message(smtp, MESSAGE)
        starttls_cert = smtp.sock.getpeercert(binary_form=True)
    with smtplib.SMTP_SSL("localhost", int(env["RELAY_TLS_PORT"]),
                          context=client_context(certs), timeout=10) as smtp:
        smtp.login(USER, PASSWORD)
        assert smtp.sock.getpeercert(binary_form=True) == starttls_cert
    upstream.wait_received(1)
    assert "unencrypted" not in process.log()


def test_without_a_certificate_the_relay_works_and_warns_once_about_cleartext(
        make_relay, upstream, caplog):
    relay = make_relay()
    for _ in range(2):
        with client(relay) as smtp:
            send_message(smtp, MESSAGE)
    upstream.wait_received(2)
    warnings = [r for r in caplog.records if "unencrypted" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_with_a_certificate_there_is_no_cleartext_warning(make_relay, certs, caplog):
    make_relay(**tls_env(certs))
    assert "unencrypted" not in log_text(caplog)


def test_allowing_auth_before_starttls_is_warned_about_once(make_relay, certs, caplog):
    relay = make_relay(**tls_env(certs, RELAY_REQUIRE_TLS=0))
    with client(relay):       # AUTH in cleartext works, as asked
        pass
    warnings = [r for r in caplog.records if "unencrypted" in r.getMessage()]
    assert len(warnings) == 1 and "RELAY_REQUIRE_TLS" in warnings[0].getMessage()


def test_shutdown_answers_421_inside_tls(make_relay, certs):
    relay = make_relay(**tls_env(certs))
    tls = connect_starttls(relay.port, certs)
    expect(tls, 250, b"EHLO client.test\r\n")
    drain = threading.Thread(target=relay.drain)
    drain.start()
    assert expect(tls, 421).startswith("421 4.3.2 ")
    drain.join(10)
    tls.close()


# ===========================================================================
# 3. The queue and its spool
# ===========================================================================


def test_kill_9_loses_no_acknowledged_message_and_the_restart_sends_them_in_arrival_order(
        upstream, run_relay, spool):
    env = relay_env(upstream.port, DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=3600)
    first = run_relay(env)
    sent = []
    for session in range(3):
        with client(first) as smtp:
            for n in range(10):
                submit(smtp, f"k9-{session}-{n}")
                sent.append(f"k9-{session}-{n}")
    assert len(spooled(spool)) == 30 and upstream.received == []
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    second = run_relay(env)             # same port, same spool; restored mail goes out at once
    upstream.wait_received(30)
    wait_for(lambda: spooled(spool) == [], what="the spool to empty")
    print(f"\nkill -9 (quiet): {len(sent)} acknowledged before kill -9, "
          f"{len(upstream.received)} received after the restart")
    assert tokens(upstream) == sent                           # each once, in arrival order
    assert "30 message(s) restored" in second.log()


def test_kill_9_while_clients_send_and_the_flusher_delivers_loses_no_acknowledged_message(
        upstream, run_relay, spool):
    env = relay_env(upstream.port, DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=0)
    attempted, acknowledged = [], []

    def sender(port, prefix, stop):
        n = 0
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.login(USER, PASSWORD)
                while not stop.is_set():
                    token = f"{prefix}-{n}"
                    n += 1
                    attempted.append(token)
                    submit(smtp, token)
                    acknowledged.append(token)
        except (OSError, smtplib.SMTPException):
            pass                      # killed under it: the message in hand was not acknowledged

    kills = []
    for round_ in range(2):           # kill -9 twice: while mail arrives, and while the
        process = run_relay(env)      # restarted relay also delivers what it restored
        stop = threading.Event()
        threads = [threading.Thread(target=sender, args=(process.port, f"r{round_}-c{k}", stop))
                   for k in range(6)]
        for thread in threads:
            thread.start()
        target = len(acknowledged) + 150
        wait_for(lambda: len(acknowledged) >= target, 20, "150 more acknowledged messages")
        process.signal(signal.SIGKILL)
        process.wait()
        kills.append((len(acknowledged), len(upstream.received)))
        stop.set()
        for thread in threads:
            thread.join(10)
    run_relay(env)
    wait_for(lambda: set(acknowledged) <= set(tokens(upstream)), 20,
             "every acknowledged message at the upstream")
    wait_for(lambda: spooled(spool) == [], what="the spool to empty")
    received = collections.Counter(tokens(upstream))
    duplicates = sum(count - 1 for count in received.values())
    print(f"\nkill -9 (busy, 2 kills): {len(attempted)} sent, {len(acknowledged)} acknowledged, "
          f"{len(received)} distinct received ({sum(received.values())} in all, "
          f"{duplicates} duplicate(s)); at the kills (acknowledged, received so far): {kills}")
    assert set(acknowledged) <= set(received)
    assert set(received) <= set(attempted)


def test_foreign_and_half_written_spool_files_are_skipped_logged_and_left_in_place(
        upstream, run_relay, spool):
    env = relay_env(upstream.port, DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=3600)
    first = run_relay(env)
    with client(first) as smtp:
        submit(smtp, "survivor")
    first.signal(signal.SIGKILL)
    first.wait()
    [good] = spooled(spool)
    content = (spool / good).read_bytes()
    bad = {
        "00000000000000001.msg": b'DISPATCH 2 {"format": "from a later version"}\nbody\r\n',
        "00000000000000002.msg": content[:-5],                        # cut short
        "00000000000000003.msg": bytes(range(256)) * 4,               # not a spool file at all
        "00000000000000004.msg": b"",
        "00000000000000005.msg": b"DISPATCH 1 {not json\nbody\r\n",
        "00000000000000006.msg": b'DISPATCH 1 {"sender": "a@example.com"}\nbody\r\n',
        "00000000000000007.msg": b"DISPATCH 1 " + b"[" * 100_000 + b"\n",
    }
    for name, data in bad.items():
        (spool / name).write_bytes(data)
    crashed = spool / "tmp" / "00000000000000008.msg"                 # a write cut by a crash
    crashed.write_bytes(content[:20])
    second = run_relay(dict(env, DISPATCH_INTERVAL="0"))
    upstream.wait_received(1)
    wait_for(lambda: spooled(spool) == sorted(bad), what="the good file to leave the spool")
    assert tokens(upstream) == ["survivor"]
    log = second.log()
    for name in list(bad) + [crashed.name]:
        assert name in log, f"{name} not logged"
    assert crashed.read_bytes() == content[:20]
    assert all((spool / name).read_bytes() == data for name, data in bad.items())
    with client(second) as smtp:                    # and the relay works as usual
        submit(smtp, "after")
    upstream.wait_received(2)
    assert "Traceback" not in second.log()


def test_a_message_that_cannot_reach_the_spool_gets_451_never_250(make_relay, upstream, spool):
    relay = make_relay(DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=3600)
    (spool / "tmp").rmdir()
    (spool / "tmp").write_bytes(b"")                # every spool write now fails
    raw = Raw(relay.port)
    raw.login()
    assert raw_message(raw, 100, 451).startswith("451 4.3.0")
    assert len(relay.queue) == 0 and spooled(spool) == ["tmp"]
    (spool / "tmp").unlink()
    (spool / "tmp").mkdir()                         # the disk is back
    raw_message(raw, 100, 250)
    assert len(spooled(spool)) == 1


def test_a_queue_id_seen_again_never_overwrites_a_spooled_message(make_relay, spool,
                                                                  monkeypatch):
    relay = make_relay(DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=3600)
    monkeypatch.setattr(dispatch, "next_queue_id", lambda: "0000000000000AAA")
    with client(relay) as smtp:
        submit(smtp, "first")
        smtp.mail("app@example.com")
        smtp.rcpt("bob@example.com")
        assert smtp.data(token_message("second"))[0] == 451
    assert spooled(spool) == ["0000000000000AAA.msg"]
    assert token_of((spool / "0000000000000AAA.msg").read_bytes()) == "first"
    assert len(relay.queue) == 1


def test_the_spool_file_goes_only_when_every_recipient_has_a_final_answer(
        make_relay, upstream, spool, caplog):
    upstream.handler.rcpt_replies.update({"gone@example.com": "550 5.1.1 No such user",
                                          "busy@example.com": "452 4.2.2 Mailbox full"})
    relay = make_relay(DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        queue_id = submit(smtp, "split",
                          to=["ok@example.com", "gone@example.com", "busy@example.com"])
    assert relay.flusher.flush()
    assert [m.recipients for m in upstream.received] == [["ok@example.com"]]
    assert len(spooled(spool)) == 1                 # still owed to busy@
    assert (f"{queue_id}: to=<gone@example.com>, relay=127.0.0.1:{upstream.port}, "
            f"status=failed (550 5.1.1 No such user)") in log_text(caplog)
    relay.drain()                                   # the last flush: busy@ still 452
    upstream.handler.rcpt_replies.clear()
    make_relay(DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=0)     # a restart from the spool
    wait_for(lambda: spooled(spool) == [], what="the spool to empty")
    # ok@ is not sent twice, gone@ never: only busy@ was still owed.
    assert [m.recipients for m in upstream.received] == [["ok@example.com"],
                                                         ["busy@example.com"]]


@pytest.mark.parametrize("refused_at", ["MAIL", "end of data"])
def test_a_5xx_for_the_whole_message_gives_it_up_logs_the_reply_and_moves_it_to_failed(
        make_relay, upstream, spool, caplog, refused_at):
    reply = "554 5.7.1 Message rejected as spam"
    if refused_at == "MAIL":
        upstream.handler.mail_replies.append(reply)
    else:
        upstream.handler.data_replies.append(reply)
    relay = make_relay(DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        refused = submit(smtp, "spam")
        submit(smtp, "ham")
    assert relay.flusher.flush()
    assert tokens(upstream) == ["ham"]
    assert len(relay.queue) == 0 and spooled(spool) == []
    [failed] = list((spool / "failed").iterdir())
    assert token_of(failed.read_bytes()) == "spam"
    lines = [line for line in log_text(caplog).splitlines() if refused in line]
    assert len([line for line in lines if reply in line]) == 1, lines


def test_a_message_older_than_max_age_is_given_up_and_logged_as_expired(
        refused_port, make_relay, spool, caplog):
    relay = make_relay(upstream_port=refused_port, DISPATCH_SPOOL=spool, DISPATCH_MAX_AGE=1,
                       DISPATCH_INTERVAL=0)
    with client(relay) as smtp:
        queue_id = submit(smtp, "old")
    wait_for(lambda: any(queue_id in line and "expired" in line
                         for line in log_text(caplog).splitlines()), 5, "the expiry")
    assert len(relay.queue) == 0 and spooled(spool) == []
    [failed] = list((spool / "failed").iterdir())
    assert token_of(failed.read_bytes()) == "old"


def test_a_message_waiting_out_a_long_retry_delay_still_expires_on_time(make_relay, upstream,
                                                                         caplog):
    relay = make_relay(DISPATCH_INTERVAL=3600, DISPATCH_MAX_AGE=1)
    upstream.handler.data_replies.append("451 4.3.0 Try again later")
    with client(relay) as smtp:
        queue_id = submit(smtp, "slow")
    relay.flusher.flush()
    [message] = relay.queue.messages
    assert message.next_try > message.arrived + 3000          # its next try is an hour away
    wait_for(lambda: time.time() - message.arrived > 1, 3, "the message to pass its max age")
    relay.flusher.flush()
    assert len(relay.queue) == 0 and upstream.received == []
    assert f"{queue_id}: to=<bob@example.com>, status=expired" in log_text(caplog)


# ===========================================================================
# 4. Delivery to the upstream
# ===========================================================================


def test_messages_arrive_at_the_upstream_byte_for_byte(relay, upstream):
    with client(relay) as smtp:
        send_message(smtp, MESSAGE, to=["bob@example.com", "carol@example.com"])
    got = upstream.wait_received(1)[0]
    assert got.data == MESSAGE
    assert got.sender == "alice@example.com"
    # 8BITMIME and SMTPUTF8 go upstream only when the client used them.
    assert "BODY=8BITMIME" not in got.options and "SMTPUTF8" not in got.options
    assert got.recipients == ["bob@example.com", "carol@example.com"]
    assert upstream.logins == ["PLAIN"]


def test_the_flush_sends_the_whole_queue_in_arrival_order_on_one_connection(make_relay,
                                                                              upstream):
    relay = make_relay(DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        for n in range(5):
            send_message(smtp, b"Subject: %d\r\n\r\nbody\r\n" % n)
    assert len(relay.queue) == 5 and upstream.received == []
    assert relay.flusher.flush()
    assert [m.data for m in upstream.received] == [b"Subject: %d\r\n\r\nbody\r\n" % n
                                                   for n in range(5)]
    assert upstream.handler.connections == 1
    assert len(relay.queue) == 0


def test_a_flush_with_nothing_due_opens_no_connection(make_relay, upstream):
    relay = make_relay(DISPATCH_INTERVAL=3600)
    assert relay.flusher.flush()
    assert upstream.handler.connections == 0


def test_the_timer_flushes_every_interval_in_one_batch(make_relay, upstream):
    arrivals = []

    def on_data(server, session, envelope):
        arrivals.append(time.monotonic())

    hook(upstream, "DATA", on_data)
    relay = make_relay(DISPATCH_INTERVAL=1)
    with client(relay) as smtp:
        # Send right after a tick, so the next one is a whole interval away.
        before = relay.metrics.last_flush
        wait_for(lambda: relay.metrics.last_flush != before, 5, "a tick of the timer")
        accepted = []
        for n in range(3):
            send_message(smtp, b"Subject: %d\r\n\r\nbody\r\n" % n)
            accepted.append(time.monotonic())
    assert accepted[-1] - accepted[0] < 0.5, "the client was too slow to test the batch"
    got = upstream.wait_received(3)
    assert [m.data for m in got] == [b"Subject: %d\r\n\r\nbody\r\n" % n for n in range(3)]
    assert upstream.handler.connections == 1         # one flush carried all three
    assert arrivals[0] - accepted[0] >= 0.8          # waited for the interval, not at once


def test_the_retry_delay_doubles_from_the_interval_up_to_dispatch_retry_max(make_relay):
    relay = make_relay(DISPATCH_INTERVAL=1, DISPATCH_RETRY_MAX=100000)
    assert [relay.flusher.retry_delay(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    capped = make_relay(DISPATCH_INTERVAL=1, DISPATCH_RETRY_MAX=5)
    assert [capped.flusher.retry_delay(n) for n in range(1, 7)] == [1, 2, 4, 5, 5, 5]


def test_upstream_from_replaces_the_envelope_sender(make_relay, upstream):
    relay = make_relay(UPSTREAM_FROM="noreply@relay.test")
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    got = upstream.wait_received(1)[0]
    assert got.sender == "noreply@relay.test" and got.data == MESSAGE


def test_upstream_replyto_is_added_only_where_missing(make_relay, upstream):
    relay = make_relay(UPSTREAM_REPLYTO="admin@relay.test")
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
        send_message(smtp, b"Reply-To: own@example.com\r\nSubject: x\r\n\r\nbody\r\n")
    first, second = upstream.wait_received(2)
    head, body = first.data.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n").count(b"Reply-To: admin@relay.test") == 1
    assert first.data.replace(b"Reply-To: admin@relay.test\r\n", b"") == MESSAGE
    assert second.data == b"Reply-To: own@example.com\r\nSubject: x\r\n\r\nbody\r\n"


def test_8bitmime_and_smtputf8_are_passed_on(relay, upstream):
    with client(relay) as smtp:
        smtp.sendmail("a@example.com", ["b@example.com"], "Subject: é\r\n\r\nçà\r\n".encode(),
                      mail_options=["BODY=8BITMIME"])
    got = upstream.wait_received(1)[0]
    assert "BODY=8BITMIME" in got.options and got.data == "Subject: é\r\n\r\nçà\r\n".encode()


def test_no_auth_is_sent_when_upstream_user_is_unset(make_relay, make_upstream):
    open_upstream = make_upstream(auth=False)
    relay = make_relay(upstream_port=open_upstream.port, UPSTREAM_USER="", UPSTREAM_PASS="")
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    open_upstream.wait_received(1)
    assert open_upstream.logins == []


def test_auth_login_is_used_when_the_upstream_offers_only_that(make_relay, make_upstream):
    login_only = make_upstream(auth_exclude_mechanism=["PLAIN"])
    relay = make_relay(upstream_port=login_only.port)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    login_only.wait_received(1)
    assert login_only.logins == ["LOGIN"]


def test_an_unreachable_upstream_leaves_the_message_queued(refused_port, make_relay, caplog):
    relay = make_relay(upstream_port=refused_port, DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    assert relay.flusher.flush() is False
    assert len(relay.queue) == 1
    assert any("status=deferred" in r.getMessage() for r in caplog.records)


def test_a_4xx_for_a_message_leaves_it_queued(make_relay, upstream):
    relay = make_relay(DISPATCH_INTERVAL=3600)
    upstream.handler.data_replies.append("451 4.3.0 Try again later")
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    relay.flusher.flush()
    assert len(relay.queue) == 1 and upstream.received == []
    relay.flusher.flush(everything=True)
    assert len(relay.queue) == 0 and upstream.received[0].data == MESSAGE


def test_log_lines_carry_the_queue_id_and_never_a_password(relay, upstream, caplog):
    caplog.set_level("DEBUG", logger="dispatch")
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    bad = base64.b64encode(f"\0{USER}\0wrong-password".encode())
    raw.expect(535, b"AUTH PLAIN " + bad + b"\r\n")
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    upstream.wait_received(1)
    wait_for(lambda: any("status=sent" in r.getMessage() for r in caplog.records))
    text = log_text(caplog)
    accepted = [r.getMessage() for r in caplog.records if "accepted from=" in r.getMessage()]
    queue_id = accepted[0].split(":")[0]
    assert accepted[0].startswith(f"{queue_id}: accepted from=<alice@example.com>, nrcpt=1, "
                                  f"size={len(MESSAGE)}, client=127.0.0.1:")
    assert f"{queue_id}: to=<bob@example.com>, relay=127.0.0.1:{upstream.port}, status=sent" \
        " (250 2.0.0 Message accepted)" in text
    for secret in (PASSWORD, "wrong-password", UPSTREAM_PASS, bad.decode(),
                   base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()):
        assert secret not in text


def test_credentials_are_never_sent_in_cleartext_without_opt_in(make_relay, upstream, caplog):
    relay = make_relay(UPSTREAM_TLS="starttls", DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    assert relay.flusher.flush() is False
    assert upstream.logins == [] and upstream.received == []
    assert any("does not offer STARTTLS" in r.getMessage() for r in caplog.records)
    assert len(relay.queue) == 1


def test_an_upstream_refusing_auth_with_535_loses_nothing_and_the_retry_backs_off(
        run_relay, make_upstream):
    provider = make_upstream(AuthRefusingUpstream, refusals=2)  # a password rotation, then fixed
    process = run_relay(relay_env(provider.port, DISPATCH_INTERVAL=0,
                                  DISPATCH_RETRY_MAX=1.5))
    with client(process) as smtp:
        queue_ids = [submit(smtp, f"rotated-{n}") for n in range(3)]
    provider.wait_received(3)
    assert tokens(provider) == ["rotated-0", "rotated-1", "rotated-2"]
    assert len(provider.auth_times) == 3        # two 535s, then the one that worked
    first, second = gaps(provider.auth_times)
    assert 0.9 <= first < 2.0                   # max(DISPATCH_INTERVAL, 1)
    assert 1.4 <= second < 3.0                  # doubled, at most DISPATCH_RETRY_MAX
    wait_for(lambda: process.log().count("status=sent") == 3, what="3 sent log lines")
    log = process.log()
    for queue_id in queue_ids:
        assert re.search(re.escape(queue_id) + r": to=<bob@example.com>, .*status=deferred "
                         r"\(.*535", log), log


def test_a_4xx_defers_only_that_message_and_it_waits_the_per_message_retry_delay(
        make_relay, upstream):
    attempts = []
    refusals = {"later": 2}

    def on_data(server, session, envelope):
        token = token_of(envelope.original_content)
        attempts.append((token, time.monotonic()))
        if refusals.get(token):
            refusals[token] -= 1
            return "451 4.3.0 Try again later"
        return None

    hook(upstream, "DATA", on_data)
    relay = make_relay(DISPATCH_INTERVAL=0, DISPATCH_RETRY_MAX=1.5)
    with client(relay) as smtp:
        submit(smtp, "later")
        submit(smtp, "now")
    upstream.wait_received(2)
    assert tokens(upstream) == ["now", "later"]     # "now" did not wait for "later"
    tries = [at for token, at in attempts if token == "later"]
    assert len(tries) == 3                          # two 451s, then accepted
    first, second = gaps(tries)
    assert 0.9 <= first < 2.0                       # max(DISPATCH_INTERVAL, 1)
    assert 1.4 <= second < 3.0                      # doubled, at most DISPATCH_RETRY_MAX
    wait_for(lambda: len(relay.queue) == 0, what="the relay to settle the message")


def test_a_connection_dropped_after_a_message_data_defers_it_and_the_batch_goes_on(
        make_relay, upstream):
    dropped = []

    def on_data(server, session, envelope):
        if token_of(envelope.original_content) == "dropped" and not dropped:
            dropped.append(True)
            return drop_connection(server)
        return None

    hook(upstream, "DATA", on_data)
    relay = make_relay(DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        for token in ("one", "dropped", "three", "four"):
            submit(smtp, token)
    assert relay.flusher.flush()
    assert tokens(upstream) == ["one", "three", "four"]
    assert upstream.handler.connections == 2 and len(relay.queue) == 1
    assert relay.flusher.flush()                    # it waits for its own retry
    assert upstream.handler.connections == 2
    assert relay.flusher.flush(everything=True)
    assert tokens(upstream) == ["one", "three", "four", "dropped"]


def test_a_connection_dropped_in_the_middle_of_a_message_does_not_stall_the_rest(
        make_relay, upstream):
    def on_rcpt(server, session, envelope, address, options):
        return drop_connection(server) if address == "poison@example.com" else None

    hook(upstream, "RCPT", on_rcpt)
    relay = make_relay(DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        submit(smtp, "one")
        submit(smtp, "poison", to=["poison@example.com"])
        submit(smtp, "three")
        submit(smtp, "four")
    relay.flusher.flush()
    assert tokens(upstream) == ["one", "three", "four"]
    assert len(relay.queue) == 1                    # kept, at least once
    connections = upstream.handler.connections
    assert relay.flusher.flush()                    # it waits for its own retry
    assert upstream.handler.connections == connections


@pytest.mark.parametrize("cap", ["421", "close"])
def test_an_upstream_capping_messages_per_connection_gets_a_reconnect_and_no_resend(
        make_relay, upstream, cap):
    def on_mail(server, session, envelope, address, options):
        if getattr(session, "messages", 0) < 2:
            return None
        if cap == "421":
            return "421 4.7.0 Too many messages on this connection"
        return drop_connection(server)

    def on_data(server, session, envelope):
        session.messages = getattr(session, "messages", 0) + 1

    hook(upstream, "MAIL", on_mail)
    hook(upstream, "DATA", on_data)
    relay = make_relay(DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        for n in range(5):
            submit(smtp, f"m{n}")
    assert relay.flusher.flush()                    # one flush, three connections
    assert tokens(upstream) == [f"m{n}" for n in range(5)]
    assert upstream.handler.connections == 3 and len(relay.queue) == 0


def test_an_upstream_taking_no_message_on_any_connection_backs_off_like_a_failed_batch(
        make_relay, upstream):
    tries = []

    def on_mail(server, session, envelope, address, options):
        tries.append(time.monotonic())
        return "421 4.7.0 Try again later" if len(tries) <= 3 else None

    hook(upstream, "MAIL", on_mail)
    relay = make_relay(DISPATCH_INTERVAL=0)
    with client(relay) as smtp:
        submit(smtp, "patient")
    upstream.wait_received(1)
    assert len(tries) == 4
    assert gaps(tries)[2] >= 0.9                    # max(DISPATCH_INTERVAL, 1), not at once
    wait_for(lambda: len(relay.queue) == 0, what="the relay to settle the message")


# ===========================================================================
# 4. Delivery to the upstream: the pipelined flush keeps order and outcomes (RFC 2920)
# ===========================================================================


# Each test runs against an upstream with and without PIPELINING: what the
# upstream receives, what stays queued and what is counted must be the same.


def test_a_451_mid_batch_defers_that_message_and_the_others_go_in_order(metrics_relay,
                                                                         provider):
    relay = metrics_relay(provider.port)
    Script(provider).on_data("m3", "451 4.3.0 Try again later")
    queue_mail(relay, *batch("m1", "m2", "m3", "m4", "m5"))
    assert relay.flusher.flush() is True
    assert subjects(provider) == ["m1", "m2", "m4", "m5"]
    assert [subject(m.data) for m in relay.queue.messages] == ["m3"]
    assert provider.handler.connections == 1
    metrics = relay_scrape(relay)
    assert (metrics["dispatch_messages_sent_total"], metrics["dispatch_messages_deferred_total"],
            metrics["dispatch_messages_failed_total"]) == (4, 1, 0)
    assert relay.flusher.flush(everything=True) is True
    assert subjects(provider) == ["m1", "m2", "m4", "m5", "m3"] and len(relay.queue) == 0


def test_a_550_for_one_recipient_drops_and_logs_it_and_the_others_get_the_message(
        metrics_relay, provider, caplog):
    relay = metrics_relay(provider.port)
    provider.handler.rcpt_replies["gone@example.com"] = "550 5.1.1 No such user"
    queue_mail(relay, ("m1", ["a@example.com"]),
               ("m2", ["b@example.com", "gone@example.com", "c@example.com"]),
               ("m3", ["d@example.com"]))
    assert relay.flusher.flush() is True
    assert subjects(provider) == ["m1", "m2", "m3"]
    assert [m.recipients for m in provider.received] == [
        ["a@example.com"], ["b@example.com", "c@example.com"], ["d@example.com"]]
    assert len(relay.queue) == 0                       # every recipient has a final answer
    failed = [r.getMessage() for r in caplog.records if "status=failed" in r.getMessage()]
    assert len(failed) == 1 and "to=<gone@example.com>" in failed[0]
    assert "550 5.1.1 No such user" in failed[0]
    metrics = relay_scrape(relay)
    assert (metrics["dispatch_messages_sent_total"], metrics["dispatch_messages_failed_total"],
            metrics["dispatch_messages_deferred_total"]) == (3, 0, 0)


def test_a_550_for_a_whole_message_takes_it_out_of_the_queue_as_failed(metrics_relay,
                                                                        provider, caplog):
    relay = metrics_relay(provider.port)
    Script(provider).on_data("m2", "550 5.7.1 Message refused by policy")
    queue_mail(relay, *batch("m1", "m2", "m3"))
    assert relay.flusher.flush() is True
    assert subjects(provider) == ["m1", "m3"]
    assert len(relay.queue) == 0
    assert any("status=failed" in r.getMessage() and "550 5.7.1 Message refused by policy"
               in r.getMessage() for r in caplog.records)
    metrics = relay_scrape(relay)
    assert (metrics["dispatch_messages_sent_total"], metrics["dispatch_messages_failed_total"],
            metrics["dispatch_messages_deferred_total"]) == (2, 1, 0)


def test_a_5xx_on_mail_fails_that_message_only(metrics_relay, provider):
    relay = metrics_relay(provider.port)
    Script(provider).on_mail("s-m2@example.com", "553 5.7.1 Sender not allowed")
    queue_mail(relay, *batch("m1", "m2", "m3"))
    assert relay.flusher.flush() is True
    assert subjects(provider) == ["m1", "m3"]
    assert [m.sender for m in provider.received] == ["s-m1@example.com", "s-m3@example.com"]
    assert len(relay.queue) == 0
    metrics = relay_scrape(relay)
    assert (metrics["dispatch_messages_sent_total"],
            metrics["dispatch_messages_failed_total"]) == (2, 1)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_an_smtputf8_message_the_upstream_cannot_take_fails_alone(metrics_relay, make_upstream,
                                                                  pipelining):
    # Skipped without a word to the upstream while the message before it is in flight.
    provider = make_upstream(pipelining=pipelining, enable_SMTPUTF8=False)
    relay = metrics_relay(provider.port)
    with client(relay) as smtp:
        for name in ("m1", "m2", "m3"):
            sender = "jös@example.com" if name == "m2" else "s@example.com"
            smtp.sendmail(sender, ["rcpt@example.com"], b"Subject: %s\r\n\r\nx\r\n"
                          % name.encode(), mail_options=["SMTPUTF8"] if name == "m2" else [])
    assert relay.flusher.flush() is True
    assert subjects(provider) == ["m1", "m3"] and len(relay.queue) == 0
    metrics = relay_scrape(relay)
    assert (metrics["dispatch_messages_sent_total"],
            metrics["dispatch_messages_failed_total"]) == (2, 1)


def test_mixed_refusals_in_one_batch_each_land_on_the_right_message(metrics_relay, provider):
    # Every kind of refusal back to back: a reply read out of step would pin one
    # message's answer on its neighbour.
    relay = metrics_relay(provider.port)
    script = Script(provider)
    provider.handler.rcpt_replies.update({"gone@example.com": "550 5.1.1 No such user",
                                          "later@example.com": "450 4.2.1 Mailbox busy"})
    script.on_data("m2", "451 4.3.0 Try again later")
    script.on_mail("s-m6@example.com", "451 4.3.2 Sender greylisted")
    script.on_mail("s-m7@example.com", "550 5.7.1 Sender refused")
    queue_mail(relay, *batch("m1", "m2"),
               ("m3", ["x@example.com", "gone@example.com"]),
               ("m4", ["gone@example.com"]),                     # every recipient refused
               ("m5", ["later@example.com", "y@example.com"]),
               *batch("m6", "m7", "m8"))
    assert relay.flusher.flush() is True
    assert subjects(provider) == ["m1", "m3", "m5", "m8"]
    assert [m.recipients for m in provider.received] == [
        ["rcpt@example.com"], ["x@example.com"], ["y@example.com"], ["rcpt@example.com"]]
    left = {subject(m.data): m.recipients for m in relay.queue.messages}
    assert left == {"m2": ["rcpt@example.com"], "m5": ["later@example.com"],
                    "m6": ["rcpt@example.com"]}
    assert provider.handler.connections == 1
    metrics = relay_scrape(relay)
    assert (metrics["dispatch_messages_sent_total"], metrics["dispatch_messages_deferred_total"],
            metrics["dispatch_messages_failed_total"]) == (4, 3, 2)   # failed: m4, m7


M1_TO_M5 = batch("m1", "m2", "m3", "m4", "m5")
ALL_BUT_M3 = ["m1", "m2", "m4", "m5"]


@pytest.mark.parametrize("misbehave, messages, sent, left, counted, retry", [
    pytest.param(lambda script: script.on_mail("s-m3@example.com",
                                               "421 4.7.0 Too many messages, closing",
                                               close=True),
                 M1_TO_M5, ["m1", "m2", "m3", "m4", "m5"], [],
                 {"dispatch_messages_sent_total": 5, "dispatch_messages_deferred_total": 0,
                  "dispatch_flush_failures_total": 0}, False,
                 id="a_421_mid_batch_reconnects_in_the_same_flush_and_sends_each_message_once"),
    pytest.param(lambda script: script.on_data("m3", "421 4.7.0 Closing connection",
                                               close=True),
                 M1_TO_M5, ALL_BUT_M3, ["m3"], {}, True,
                 id="a_421_after_the_data_defers_that_message_and_the_rest_go_on_a_new_connection"),
    # The provider takes m2, says 250, and hangs up before m3's commands.
    pytest.param(lambda script: script.on_data("m2", None, close=True),
                 M1_TO_M5, ["m1", "m2", "m3", "m4", "m5"], [], {}, False,
                 id="a_connection_dropped_mid_batch_reconnects_and_sends_each_message_once"),
    # The provider hangs up instead of answering m3's end of data.
    pytest.param(lambda script: script.on_data("m3", SILENT),
                 M1_TO_M5, ALL_BUT_M3, ["m3"],
                 {"dispatch_messages_sent_total": 4, "dispatch_messages_deferred_total": 1},
                 False,
                 id="a_connection_dropped_before_the_end_of_data_reply_defers_only_that_message"),
    # The provider hangs up at m3's RCPT, after its MAIL got 250.
    pytest.param(lambda script: script.on_rcpt("cut@example.com", SILENT),
                 [*batch("m1", "m2"), ("m3", ["cut@example.com"]), *batch("m4", "m5")],
                 ALL_BUT_M3, ["m3"], {}, True,
                 id="a_connection_dropped_inside_a_transaction_defers_that_message_"
                    "and_the_rest_go_on"),
])
def test_a_421_or_a_hang_up_mid_batch_gets_one_reconnect_in_the_same_flush(
        metrics_relay, provider, misbehave, messages, sent, left, counted, retry):
    relay = metrics_relay(provider.port)
    misbehave(Script(provider))
    queue_mail(relay, *messages)
    assert relay.flusher.flush() is True
    assert subjects(provider) == sent
    assert [subject(m.data) for m in relay.queue.messages] == left
    assert provider.handler.connections == 2
    if counted:
        metrics = relay_scrape(relay)
        assert {name: metrics[name] for name in counted} == counted
    if retry:
        assert relay.flusher.flush(everything=True) is True
        assert subjects(provider) == sent + left


def test_an_upstream_that_keeps_hanging_up_gets_a_bounded_number_of_reconnects(
        metrics_relay, provider):
    relay = metrics_relay(provider.port)
    # m1's MAIL is cut off on every connection, so no connection makes progress.
    provider.handler.handle_MAIL = hang_up_on(provider.handler.handle_MAIL, "s-m1@example.com")
    queue_mail(relay, *batch("m1", "m2"))
    relay.flusher.flush()
    assert provider.received == []
    assert len(relay.queue) == 2
    assert provider.handler.connections == dispatch.Flusher.MAX_FRUITLESS_RECONNECTS


def hang_up_on(original, sender):
    async def hook(server, session, envelope, address, options):
        if address == sender:
            server.transport.close()
            return "250 never sent"
        return await original(server, session, envelope, address, options)
    return hook


# -- the relay really pipelines when the upstream allows it --------------------


@pytest.fixture
def proxied(metrics_relay, provider):
    """(relay, provider, proxy): the relay reaches the provider through a recording proxy."""
    proxy = RecordingProxy(provider.port)
    yield metrics_relay(proxy.port), provider, proxy
    proxy.close()


def test_with_pipelining_each_message_costs_one_write_and_without_it_four(proxied):
    relay, provider, proxy = proxied
    count = 10
    queue_mail(relay, *batch(*(f"m{n}" for n in range(count))))
    assert relay.flusher.flush() is True
    assert subjects(provider) == [f"m{n}" for n in range(count)]
    assert len(proxy.connections) == 1 and provider.handler.connections == 1
    wait_for(lambda: any(chunk.upper().startswith(b"QUIT") for chunk in proxy.connections[0]),
             what="the relay's QUIT")
    writes = proxy.connections[0]
    envelopes = [chunk for chunk in writes if b"MAIL FROM:" in chunk]
    if provider.handler.pipelining:
        # EHLO, AUTH, the first envelope, then each message's data with the next
        # envelope (RFC 2920: DATA last in a group), the last data, QUIT.
        assert len(writes) <= count + 4, [w[:40] for w in writes]
        assert len(envelopes) == count
        for chunk in envelopes:
            tail = chunk[chunk.index(b"MAIL FROM:"):]
            assert tail.count(b"MAIL FROM:") == 1 and b"RCPT TO:<rcpt@example.com>" in tail
            assert tail.endswith(b"DATA\r\n")
        assert sum(b"\r\n.\r\nMAIL FROM:" in chunk for chunk in envelopes) == count - 1
    else:
        assert len(writes) >= 4 * count, [w[:40] for w in writes]
        for chunk in envelopes:
            assert chunk.startswith(b"MAIL FROM:") and b"RCPT" not in chunk


# ===========================================================================
# 4. Delivery to the upstream: strict TLS
# ===========================================================================


def test_delivery_through_an_upstream_that_requires_starttls(make_relay, make_upstream, certs):
    upstream = make_upstream(tls_context=server_context(certs), require_starttls=True,
                             auth_require_tls=True)
    relay = make_relay(upstream.port, UPSTREAM_TLS="starttls", UPSTREAM_CA_FILE=certs.ca)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    assert upstream.wait_received(1)[0].data == MESSAGE
    assert upstream.logins == ["PLAIN"]


def test_delivery_through_an_implicit_tls_upstream(make_relay, make_upstream, certs):
    upstream = make_upstream(ssl_context=server_context(certs))
    relay = make_relay(upstream.port, UPSTREAM_TLS="tls", UPSTREAM_CA_FILE=certs.ca)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    assert upstream.wait_received(1)[0].data == MESSAGE
    assert upstream.logins == ["PLAIN"]


@pytest.mark.parametrize("mode", ["starttls", "tls"])
@pytest.mark.parametrize("presented", ["other", "wrong_name"],
                         ids=["unrelated-ca", "wrong-host-name"])
def test_an_upstream_certificate_that_does_not_verify_gets_no_credentials_and_no_mail(
        make_relay, make_upstream, certs, caplog, mode, presented):
    cert, key = getattr(certs, presented + "_cert"), getattr(certs, presented + "_key")
    tls = {"starttls": {"tls_context": server_context(certs, cert, key),
                        "require_starttls": True, "auth_require_tls": True},
           "tls": {"ssl_context": server_context(certs, cert, key)}}[mode]
    upstream = make_upstream(**tls)
    relay = make_relay(upstream.port, UPSTREAM_TLS=mode, UPSTREAM_CA_FILE=certs.ca,
                       DISPATCH_INTERVAL=3600)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    assert relay.flusher.flush() is False
    assert upstream.logins == [] and upstream.received == []
    assert len(relay.queue) == 1
    deferred = [r.getMessage() for r in caplog.records if "status=deferred" in r.getMessage()]
    assert len(deferred) == 1 and "certificate" in deferred[0]


def test_upstream_tls_verify_0_accepts_an_untrusted_certificate(make_relay, make_upstream,
                                                                certs):
    upstream = make_upstream(tls_context=server_context(certs, certs.other_cert,
                                                        certs.other_key),
                             require_starttls=True, auth_require_tls=True)
    relay = make_relay(upstream.port, UPSTREAM_TLS="starttls", UPSTREAM_CA_FILE=certs.ca,
                       UPSTREAM_TLS_VERIFY=0)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    assert upstream.wait_received(1)[0].data == MESSAGE


def test_an_upstream_without_starttls_gets_no_auth_and_the_message_stays_queued(
        make_relay, make_upstream, certs, caplog):
    upstream = make_upstream()          # offers AUTH in cleartext, no STARTTLS
    relay = make_relay(upstream.port, UPSTREAM_TLS="starttls", UPSTREAM_CA_FILE=certs.ca,
                       DISPATCH_INTERVAL=3600, **tls_env(certs))
    with tls_client(relay, certs) as smtp:
        send_message(smtp, MESSAGE)
    assert relay.flusher.flush() is False
    assert upstream.handler.connections == 1          # it was asked, and told nothing
    assert upstream.logins == [] and upstream.received == []
    assert len(relay.queue) == 1
    deferred = [r.getMessage() for r in caplog.records if "status=deferred" in r.getMessage()]
    assert len(deferred) == 1 and "STARTTLS" in deferred[0]


# ===========================================================================
# 5. Health and metrics: the exposition parser rejects what Prometheus rejects
# ===========================================================================


@pytest.mark.parametrize("body", [
    "# HELP a_total x\n# TYPE a_total counter\na_total 1",                  # no final LF
    "a_total 1\n",                                                           # no HELP/TYPE
    "# TYPE a_total counter\na_total 1\n",                                   # no HELP
    "# HELP a_total x\na_total 1\n",                                         # no TYPE
    "# HELP a_total x\n# TYPE a_total counter\na_total 1\n# TYPE a_total counter\n",
    "# HELP 1a x\n# TYPE 1a gauge\n1a 1\n",                                  # bad name
    "# HELP a x\n# TYPE a gauge\na{1x=\"v\"} 1\n",                           # bad label name
    "# HELP a x\n# TYPE a gauge\na{x=v} 1\n",                                # unquoted value
    "# HELP a x\n# TYPE a gauge\na{x=\"a\"b\"} 1\n",                         # unescaped quote
    "# HELP a x\n# TYPE a gauge\na{x=\"\\q\"} 1\n",                          # bad escape
    "# HELP a x\n# TYPE a gauge\na{x=\"v\"} 1\na{x=\"v\"} 2\n",              # repeated
    "# HELP a x\n# TYPE a gauge\na one\n",                                   # bad value
    "# HELP a x\n# TYPE a gauge\na 1.7e+09x\n",
    "# HELP a x\n# TYPE a gauge\n# HELP b x\n# TYPE b gauge\nb 1\na 1\n",    # split group
    "# HELP a x\n# TYPE a counter\na 1\n",                                   # no _total
    "# HELP a x\n# TYPE a wibble\na 1\n",                                    # unknown type
], ids=["no-final-lf", "no-help-or-type", "no-help", "no-type", "type-twice", "bad-name",
        "bad-label-name", "unquoted-label", "unescaped-quote", "bad-escape", "repeated-sample",
        "bad-value", "trailing-junk", "split-group", "counter-without-total", "unknown-type"])
def test_the_exposition_parser_rejects_what_prometheus_rejects(body):
    with pytest.raises(ExpositionError):
        parse_exposition(body)


def test_the_exposition_parser_accepts_valid_text_with_escapes_and_empty_families():
    families = parse_exposition(
        "# HELP a_total with \\\\ and \\n\n# TYPE a_total counter\n"
        'a_total{k="q\\"b\\\\n\\n",j="2",} 3 1700000000000\n\n'
        "# HELP e_total nothing yet\n# TYPE e_total counter\n"
        "# HELP g x\n# TYPE g gauge\ng -Inf\n# a comment\n")
    assert families["a_total"].help == "with \\ and \n"
    assert families["a_total"].samples == {("a_total", (("j", "2"), ("k", 'q"b\\n\n'))): 3.0}
    assert families["e_total"].samples == {} and families["g"].samples[("g", ())] == -math.inf


# ===========================================================================
# 5. Health and metrics: /metrics
# ===========================================================================


def test_metrics_is_valid_prometheus_text_with_every_name_the_spec_lists(metrics_relay):
    relay = metrics_relay()
    status, kind, body = http_get(metrics_port(relay), "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    families = parse_exposition(body)
    for name in SPEC_COUNTERS:
        assert families[name].type == "counter", name
        assert families[name].help, name
    for name in SPEC_GAUGES:
        assert families[name].type == "gauge", name
        assert list(families[name].samples) == [(name, ())], name    # one unlabelled sample
    for name in SPEC_COUNTERS:
        if name != "dispatch_messages_refused_total":
            assert families[name].samples == {(name, ()): 0.0}, name
    # Every sample of the refusals counter carries exactly one label, reason.
    assert all([k for k, _ in labels] == ["reason"]
               for _, labels in families["dispatch_messages_refused_total"].samples)
    assert all(name.startswith("dispatch_") for name in families)


def test_refusal_reasons_are_exported_at_zero_before_the_first_refusal(metrics_relay):
    # A series that appears only with the first refusal is invisible to rate() and
    # increase() for that first refusal: known label values start at 0.
    metrics = relay_scrape(metrics_relay())
    for reason in ("auth", "auth_required", "size", "queue_full", "recipients", "connections"):
        assert metrics.value("dispatch_messages_refused_total", reason=reason) == 0, reason


def test_accepted_sent_deferred_and_failed_counters_follow_real_mail(metrics_relay, upstream):
    relay = metrics_relay()
    script = Script(upstream)
    script.on_data("one", "451 4.3.0 Try again later")
    script.on_data("two", "550 5.7.1 Refused by policy")
    start = relay_scrape(relay)
    assert [start[n] for n in ("dispatch_messages_accepted_total", "dispatch_queue_messages",
                               "dispatch_last_flush_timestamp_seconds")] == [0, 0, 0]
    queue_mail(relay, *batch("one", "two", "three"))
    queued = relay_scrape(relay)
    assert queued["dispatch_messages_accepted_total"] == 3
    assert queued["dispatch_queue_messages"] == 3
    assert queued["dispatch_queue_bytes"] == sum(len(m.data) for m in relay.queue.messages)
    assert queued["dispatch_queue_bytes"] > 0
    assert 0 <= queued["dispatch_queue_oldest_age_seconds"] < 60
    assert queued["dispatch_messages_sent_total"] == 0

    before = time.time()
    assert relay.flusher.flush() is True
    after = time.time()
    flushed = relay_scrape(relay)
    assert subjects(upstream) == ["three"]
    assert flushed["dispatch_messages_sent_total"] == 1
    assert flushed["dispatch_messages_deferred_total"] == 1        # "one": 451
    assert flushed["dispatch_messages_failed_total"] == 1          # "two": 550
    assert flushed["dispatch_flush_failures_total"] == 0           # a message's fault only
    assert flushed["dispatch_queue_messages"] == 1
    assert flushed["dispatch_queue_bytes"] == len(relay.queue.messages[0].data)
    assert flushed["dispatch_messages_accepted_total"] == 3
    assert before <= flushed["dispatch_last_flush_timestamp_seconds"] <= after
    assert_monotonic(queued, flushed)

    assert relay.flusher.flush(everything=True) is True             # "one" goes this time
    final = relay_scrape(relay)
    assert subjects(upstream) == ["three", "one"]
    assert [final[n] for n in ("dispatch_messages_sent_total", "dispatch_messages_deferred_total",
                               "dispatch_messages_failed_total", "dispatch_queue_messages",
                               "dispatch_queue_bytes", "dispatch_queue_oldest_age_seconds")] \
        == [2, 1, 1, 0, 0, 0]
    assert_monotonic(flushed, final)


def test_last_flush_time_and_duration_are_exported_at_full_precision(metrics_relay, upstream):
    relay = metrics_relay()
    queue_mail(relay, *batch("one"))
    before = time.time()
    relay.flusher.flush()
    after = time.time()
    upstream.wait_received(1)
    metrics = relay_scrape(relay)
    # A Unix time printed with 6 significant digits ("1.76e+09") is hours off.
    assert before <= metrics["dispatch_last_flush_timestamp_seconds"] <= after
    assert 0 < metrics["dispatch_last_flush_duration_seconds"] <= after - before


def test_refusals_are_counted_by_reason_auth_size_and_queue_full(metrics_relay):
    relay = metrics_relay(RELAY_MAX_SIZE=1000, DISPATCH_MAX_QUEUE=1500)
    refused = lambda metrics, reason: metrics.value(  # noqa: E731
        "dispatch_messages_refused_total", reason=reason)
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(530, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(535, auth_plain(password="wrong"))
    raw.expect(235, auth_plain())
    metrics = relay_scrape(relay)
    assert metrics["dispatch_auth_failures_total"] == 1
    assert refused(metrics, "auth") == 1 and refused(metrics, "auth_required") == 1
    assert refused(metrics, "size") == 0 and refused(metrics, "queue_full") == 0

    def transaction(size):
        raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
        raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
        raw.expect(354, b"DATA\r\n")
        raw.send(b"x" * (size - 2) + b"\r\n.\r\n")
        return raw.reply()[1]

    raw.expect(552, b"MAIL FROM:<a@example.com> SIZE=5000\r\n")      # declared too big
    assert transaction(1200).startswith("552 5.3.4")                    # too big in fact
    assert refused(relay_scrape(relay), "size") == 2
    assert transaction(900).startswith("250 ")
    assert transaction(700).startswith("452 4.3.1")      # 900 + 700 would cross 1500
    assert transaction(600).startswith("250 ")           # 1500 exactly: full now
    raw.expect(452, b"MAIL FROM:<a@example.com>\r\n")
    metrics = relay_scrape(relay)
    assert refused(metrics, "queue_full") == 2
    assert metrics["dispatch_messages_accepted_total"] == 2
    assert metrics["dispatch_queue_bytes"] == 1500
    assert (metrics["dispatch_auth_failures_total"], refused(metrics, "auth"),
            refused(metrics, "size")) == (1, 1, 2)


def test_refusals_are_counted_by_reason_recipients_and_connections(metrics_relay):
    relay = metrics_relay(RELAY_MAX_RECIPIENTS=1, RELAY_MAX_CONNECTIONS=1)
    refused = lambda reason: relay_scrape(relay).value(  # noqa: E731
        "dispatch_messages_refused_total", reason=reason)
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b1@example.com>\r\n")
    raw.expect(452, b"RCPT TO:<b2@example.com>\r\n")
    assert refused("recipients") == 1
    assert refused("connections") == 0
    extra = Raw(relay.port, greeting=False)
    assert extra.expect(421).startswith("421 4.7.0")
    wait_for(lambda: refused("connections") == 1, what="the refused connection counted")
    assert refused("recipients") == 1


def test_healthz_is_503_while_draining(metrics_relay, upstream):
    relay = metrics_relay(DISPATCH_DRAIN_TIMEOUT=10)
    assert healthz(relay) == (200, "ok\n")
    stuck = Raw(relay.port)            # holds the drain in its wait for DATA to finish
    stuck.start_data()
    stuck.send(b"Subject: in data\r\n\r\n")
    drain = threading.Thread(target=relay.drain)
    drain.start()
    try:
        wait_for(lambda: relay.draining, what="the drain to begin")
        status, body = healthz(relay)
        assert status == 503 and body.endswith("\n") and len(body.strip()) > 10, body
    finally:
        stuck.send(b"the end\r\n.\r\n")
        drain.join(15)
    assert not drain.is_alive()
    assert subjects(upstream) == ["in data"]


def test_sessions_open_counts_live_client_sessions(metrics_relay):
    relay = metrics_relay()
    value = lambda: relay_scrape(relay)["dispatch_sessions_open"]  # noqa: E731
    assert value() == 0
    first, second = Raw(relay.port), Raw(relay.port)
    wait_for(lambda: value() == 2, what="two open sessions")
    first.expect(221, b"QUIT\r\n")
    first.close()
    wait_for(lambda: value() == 1, what="one open session")
    second.close()
    wait_for(lambda: value() == 0, what="no open session")


def test_label_values_are_escaped_so_the_exposition_stays_valid(metrics_relay):
    relay = metrics_relay()
    odd = 'a "quoted" back\\slash\nand a line feed'
    relay.metrics.refused(odd)
    metrics = relay_scrape(relay)
    assert metrics.value("dispatch_messages_refused_total", reason=odd) == 1


def test_an_unknown_path_is_404(metrics_relay):
    status, _, _ = http_get(metrics_port(metrics_relay()), "/nothing-here")
    assert status == 404


# ===========================================================================
# 5. Health and metrics: /healthz
# ===========================================================================


def test_healthz_is_503_after_three_failed_flushes_and_200_after_the_next_good_one(
        metrics_relay, make_upstream):
    provider = make_upstream()
    relay = metrics_relay(provider.port)
    port = provider.port
    assert healthz(relay) == (200, "ok\n")
    queue_mail(relay, *batch("one"))
    provider.stop()                               # the provider is down
    for failures in (1, 2):
        assert relay.flusher.flush() is False
        assert healthz(relay) == (200, "ok\n"), f"after {failures} failed flush(es)"
    assert relay.flusher.flush() is False
    status, body = healthz(relay)
    assert status == 503
    assert body.endswith("\n") and body.count("\n") == 1 and len(body.strip()) > 10, body
    # It says what is wrong and why: the provider's address, refusing connections.
    assert "3 flushes" in body and f"127.0.0.1:{port}" in body and "refused" in body, body
    metrics = relay_scrape(relay)
    assert metrics["dispatch_flush_failures_total"] == 3
    assert metrics["dispatch_messages_deferred_total"] == 3        # the one message, 3 times
    assert metrics["dispatch_queue_messages"] == 1

    restarted = make_upstream(port=port)
    assert relay.flusher.flush() is True
    assert healthz(relay) == (200, "ok\n")
    assert subjects(restarted) == ["one"]
    metrics = relay_scrape(relay)
    assert metrics["dispatch_flush_failures_total"] == 3       # a counter never resets
    assert metrics["dispatch_messages_sent_total"] == 1


def test_healthz_counts_only_flushes_failed_in_a_row(metrics_relay, make_upstream):
    provider = make_upstream()
    relay = metrics_relay(provider.port)
    queue_mail(relay, *batch("one"))
    port = provider.port
    provider.stop()
    assert relay.flusher.flush() is False
    assert relay.flusher.flush() is False
    restarted = make_upstream(port=port)
    assert relay.flusher.flush() is True
    restarted.stop()
    queue_mail(relay, *batch("two"))
    assert relay.flusher.flush() is False
    assert relay.flusher.flush() is False
    assert healthz(relay) == (200, "ok\n")           # 2 + 2 failures, never 3 in a row
    assert relay_scrape(relay)["dispatch_flush_failures_total"] == 4


def test_healthz_recovers_when_the_failing_mail_expires_and_the_queue_empties(
        refused_port, metrics_relay):
    relay = metrics_relay(refused_port, DISPATCH_MAX_AGE=1)      # nothing listens there
    queue_mail(relay, *batch("doomed"))
    for _ in range(3):
        assert relay.flusher.flush() is False
    assert healthz(relay)[0] == 503
    [message] = relay.queue.messages
    wait_for(lambda: time.time() - message.arrived > 1, 3, "the message to pass its max age")
    assert relay.flusher.flush() is True                # expired: nothing left to fail
    assert len(relay.queue) == 0
    assert healthz(relay) == (200, "ok\n")
    assert relay_scrape(relay)["dispatch_messages_failed_total"] == 1     # expiry is a failure


def test_a_refusing_upstream_is_not_an_unhealthy_one(metrics_relay, upstream):
    # Per-message 5xx/4xx are the messages' business, not the relay's health.
    relay = metrics_relay()
    upstream.handler.data_replies.extend(["451 4.3.0 later"] * 4)
    queue_mail(relay, *batch("one"))
    for _ in range(4):
        assert relay.flusher.flush(everything=True) is True
    assert healthz(relay) == (200, "ok\n")
    assert relay_scrape(relay)["dispatch_flush_failures_total"] == 0


def test_a_real_dispatch_process_serves_metrics_on_dispatch_metrics_bind(upstream, run_relay):
    script = Script(upstream)
    script.on_data("two", "451 4.3.0 Try again later")
    port = free_port()
    env = relay_env(upstream.port, DISPATCH_INTERVAL="0", DISPATCH_METRICS_PORT=port,
                    DISPATCH_METRICS_BIND="127.0.0.2")
    process = run_relay(env)
    with smtplib.SMTP("127.0.0.1", process.port, timeout=10) as smtp:
        smtp.login(USER, PASSWORD)
        for name in ("one", "two", "three"):
            send_message(smtp, b"Subject: %s\r\n\r\nbody\r\n" % name.encode())
    deferred = wait_for(lambda: (lambda m: m if m["dispatch_messages_deferred_total"] >= 1
                                 and m["dispatch_messages_sent_total"] >= 2 else None)(
        scrape(port, "127.0.0.2")), what="two sent and one deferred")
    assert deferred["dispatch_messages_accepted_total"] == 3
    assert healthz(port, "127.0.0.2") == (200, "ok\n")
    # The deferred message goes on its retry, a second later.
    wait_for(lambda: (lambda m: m["dispatch_messages_sent_total"] == 3
                      and m["dispatch_queue_messages"] == 0
                      and m["dispatch_sessions_open"] == 0)(scrape(port, "127.0.0.2")),
             what="the deferred message sent on retry, the queue empty, no session open")
    assert sorted(subjects(upstream)) == ["one", "three", "two"]
    # DISPATCH_METRICS_BIND is honoured: nothing listens on the relay's address.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# ===========================================================================
# 6. The life cycle: SIGTERM and SIGINT
# ===========================================================================


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_sends_queued_mail_in_a_last_flush_and_exits_0(upstream, run_relay,
                                                                       signum):
    process = run_relay(relay_env(upstream.port, DISPATCH_INTERVAL=3600,
                                  DISPATCH_DRAIN_TIMEOUT=5))
    with client(process) as smtp:
        for n in range(3):
            submit(smtp, f"queued-{n}")
    assert upstream.received == []
    started = time.monotonic()
    process.signal(signum)
    assert process.wait(10) == 0
    assert time.monotonic() - started < 5
    assert tokens(upstream) == ["queued-0", "queued-1", "queued-2"]
    assert "lost" not in process.log()


def test_without_a_spool_no_250_comes_after_the_last_flush_has_begun(make_relay, upstream):
    relay = make_relay(DISPATCH_INTERVAL=3600)
    late = Raw(relay.port)
    late.start_data()
    relay.flusher.stop(time.monotonic() + 5)    # what a drain does once DATA's share is up
    assert late.expect(421, b"Subject: late\r\n\r\nx\r\n.\r\n").startswith("421 4.3.2")
    relay.flusher.join(5)
    assert len(relay.queue) == 0 and upstream.received == []


def test_sigterm_lets_a_message_in_data_finish_with_its_250_and_tells_idle_sessions_421(
        upstream, run_relay):
    process = run_relay(relay_env(upstream.port, DISPATCH_INTERVAL=3600))
    idle = Raw(process.port)
    idle.login()
    busy = Raw(process.port)
    busy.start_data()
    busy.send(b"X-Token: in-data\r\n\r\nthe first half, ")
    process.signal(signal.SIGTERM)
    assert idle.expect(421).startswith("421 4.3.2")
    assert idle.closed()
    wait_for(lambda: not accepting(process.port), what="the listener to close")
    busy.send(b"and the second half\r\n.\r\n")
    assert "queued as" in busy.expect(250)
    assert busy.expect(421).startswith("421 4.3.2")
    assert process.wait(10) == 0
    assert tokens(upstream) == ["in-data"]


def test_sigterm_with_the_upstream_down_exits_0_in_time_and_logs_how_many_are_lost(
        refused_port, run_relay):
    process = run_relay(relay_env(refused_port, DISPATCH_INTERVAL=3600,
                                  DISPATCH_DRAIN_TIMEOUT=2))
    with client(process) as smtp:
        submit(smtp, "lost-1")
        submit(smtp, "lost-2")
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert time.monotonic() - started < 4             # twice DISPATCH_DRAIN_TIMEOUT
    messages = [line.split("]: ", 1)[-1] for line in process.log().splitlines()]
    assert [m for m in messages if "lost" in m and re.search(r"\b2\b", m)], messages


def test_sigterm_with_a_spool_keeps_undelivered_mail_for_the_next_start(run_relay, spool,
                                                                        make_upstream):
    provider = make_upstream()
    port = provider.port
    provider.stop()                                 # the upstream is down
    env = relay_env(port, DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=3600,
                    DISPATCH_DRAIN_TIMEOUT=2)
    first = run_relay(env)
    with client(first) as smtp:
        submit(smtp, "kept-1")
        submit(smtp, "kept-2")
    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0
    assert len(spooled(spool)) == 2 and "lost" not in first.log()
    provider = make_upstream(port=port)             # the upstream is back, on its port
    run_relay(dict(env, DISPATCH_INTERVAL="0"))
    provider.wait_received(2)
    wait_for(lambda: spooled(spool) == [], what="the spool to empty")
    assert tokens(provider) == ["kept-1", "kept-2"]


def test_sigterm_exits_0_within_the_drain_timeout_even_with_a_client_stuck_in_data(
        upstream, run_relay):
    process = run_relay(relay_env(upstream.port, DISPATCH_INTERVAL=3600,
                                  DISPATCH_DRAIN_TIMEOUT=1))
    stuck = Raw(process.port)
    stuck.start_data()
    stuck.send(b"Subject: never finished\r\n\r\n")
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert time.monotonic() - started < 2
    assert stuck.reply()[0] in (None, 421)          # never a 250: the message is not ours
    assert upstream.received == []


def test_a_client_stuck_in_data_leaves_the_last_flush_its_share_of_the_drain(upstream,
                                                                              run_relay):
    process = run_relay(relay_env(upstream.port, DISPATCH_INTERVAL=3600,
                                  DISPATCH_DRAIN_TIMEOUT=2))
    with client(process) as smtp:
        submit(smtp, "queued-before-the-stop")
    stuck = Raw(process.port)
    stuck.start_data()
    stuck.send(b"Subject: never finished\r\n\r\n")
    process.signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert tokens(upstream) == ["queued-before-the-stop"]
    assert "lost" not in process.log()


# ===========================================================================
# 6. The life cycle: many clients at once
# ===========================================================================


def test_500_messages_from_20_concurrent_clients_arrive_exactly_once(upstream, run_relay,
                                                                     spool):
    process = run_relay(relay_env(upstream.port, DISPATCH_SPOOL=spool, DISPATCH_INTERVAL=0))
    start = threading.Barrier(20)
    queue_ids, errors = [], []

    def sender(k):
        try:
            with client(process) as smtp:
                start.wait(10)
                for n in range(25):
                    queue_ids.append(submit(smtp, f"c{k:02d}-{n:02d}"))
        except (OSError, smtplib.SMTPException, AssertionError,
                threading.BrokenBarrierError) as exc:     # reported below, with the counts
            errors.append(repr(exc))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    upstream.wait_received(500, timeout=30)
    wait_for(lambda: spooled(spool) == [], what="the spool to empty")
    received = collections.Counter(tokens(upstream))
    print(f"\nconcurrency: 20 clients x 25 = 500 sent, {len(queue_ids)} acknowledged, "
          f"{sum(received.values())} received, {len(received)} distinct, errors: {errors}")
    assert errors == [] and len(set(queue_ids)) == 500
    assert sorted(received) == sorted(f"c{k:02d}-{n:02d}" for k in range(20) for n in range(25))
    assert set(received.values()) == {1}
    for k in range(20):                             # each client's mail in its order
        mine = [t for t in tokens(upstream) if t.startswith(f"c{k:02d}-")]
        assert mine == sorted(mine)
