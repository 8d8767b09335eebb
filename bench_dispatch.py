#!/usr/bin/env python3
"""Benchmark Dispatch against aiosmtpd: the figures of SPEC.md section 4.

    python bench_dispatch.py [--rounds N] [--quick] [--relay PATH] [--baseline-pipelining]

What it runs, all on 127.0.0.1, every process killed at exit:

* throughput, interleaved over --rounds rounds (the order of the two servers
  alternates from round to round so noise hits both alike):
  (a) 20 concurrent sessions of one 10 KB message, (b) 8 concurrent sessions
  of 50 messages of 10 KB, (c) one 5 MB message; against ``python dispatch.py``
  and against an aiosmtpd server doing the same job in its own process (AUTH
  PLAIN required, bcrypt remembered after the first success, every message
  kept in memory), with one asyncio load generator for both.  It pipelines
  (RFC 2920) only for a server that advertises PIPELINING, which stock
  aiosmtpd does not (--baseline-pipelining makes the baseline advertise it);
* (d) auth cost: dispatch sessions EHLO + AUTH PLAIN + QUIT against
  EHLO + NOOP + QUIT, once the password has been seen;
* memory: RSS growth of a fresh relay for 10,000 queued 10 KB messages, and
  its peak while it takes one 10 MB message;
* flush round trips: 200 queued messages flushed on SIGTERM to an aiosmtpd
  sink behind a proxy that delays every chunk 10 ms each way (timed, and the
  relay's flights counted by the proxy; the bytes and the count the sink got
  are checked); compared with a sink that does not advertise PIPELINING and
  with smtplib sending one message per connection.

Missed targets are reported (exit status 0); a workload that fails -- a wrong
reply code, a closed connection, a timeout, a relay that dies -- makes the exit
status 1.  A full run takes about 1.5 minutes on 2 cores, --quick about 40 s.
Needs Python 3.11+, bcrypt and aiosmtpd.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import logging
import math
import multiprocessing
import os
import queue
import random
import re
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------

HOST = "127.0.0.1"
RELAY_NAME = "bench.local"
USERNAME = "bench"
PASSWORD = "correct horse battery staple"
SENDER = "app@bench.local"
RECIPIENT = "someone@example.com"

KB = 1000
MB = 1000 * KB
MAX_SIZE = 20_000_000            # RELAY_MAX_SIZE, and aiosmtpd's data_size_limit
ONE_WAY_DELAY = 0.010            # seconds the proxy holds every chunk
ROUND_TRIP = 2 * ONE_WAY_DELAY

READY_DEADLINE = 20.0            # seconds a server gets to greet
WORKLOAD_TIMEOUT = 60.0          # seconds any one measurement may take
DRAIN_DEADLINE = 120.0           # seconds a SIGTERM flush may take

TARGET_AUTH_COST = 1.1
TARGET_MEMORY = 1.15
TARGET_FLUSH_ROUND_TRIPS = 1.2
MEMORY_MESSAGES = 10_000
FLUSH_MESSAGES = 200


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------

WORDS = (
    "the relay queues every message it accepts and forwards the whole batch "
    "to one upstream provider over a single connection when the interval "
    "expires; operators rotate one password instead of fifty while clients "
    "keep sending reports invoices alerts receipts and newsletters to their "
    "customers every day of the week"
).split()


@dataclass(frozen=True)
class Message:
    """One test message: ``content`` as the client means it, ``wire`` as sent after DATA."""

    content: bytes
    wire: bytes


def text_lines(count: int, rng: random.Random) -> list[bytes]:
    """Lines of about 76 characters; every ninth begins with '.', a few are a lone '.'."""
    lines = []
    for number in range(count):
        words, length = [], 0
        while length < 72:
            word = rng.choice(WORDS)
            words.append(word)
            length += len(word) + 1
        line = " ".join(words)
        if number % 50 == 25:
            line = "."
        elif number % 9 == 4:
            line = "." + line
        lines.append(line.encode() + b"\r\n")
    return lines


def make_message(size: int, seed: int = 1) -> Message:
    """A plain-text mail of at least ``size`` bytes (headers, blank line, body), and its
    dot-stuffed form for the wire."""
    rng = random.Random(seed)
    headers = (
        f"From: Bench App <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: Benchmark message of {size} bytes\r\n"
        "Date: Tue, 25 Nov 2025 11:40:00 +0000\r\n"
        f"Message-ID: <{seed}.{size}@{RELAY_NAME}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    pool = text_lines(512, rng)
    body, length = [], len(headers)
    while length < size:
        line = rng.choice(pool)
        body.append(line)
        length += len(line)
    content = headers + b"".join(body)
    wire = re.sub(rb"(?m)^\.", b"..", content) + b".\r\n"
    return Message(content, wire)


# --------------------------------------------------------------------------
# Load generator
# --------------------------------------------------------------------------

class SmtpError(Exception):
    """A reply the load generator did not expect: the workload fails."""


class Client:
    """One SMTP session over asyncio streams; every reply code is checked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.extensions: set[str] = set()

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port)
        client = cls(reader, writer)
        await client.expect(b"220", b"<connect>")
        return client

    async def expect(self, code: bytes, sent: bytes) -> list[bytes]:
        """Read one (possibly multi-line) reply; raise SmtpError unless it has ``code``."""
        lines = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise SmtpError(f"after {sent[:60]!r}: connection closed "
                                f"(expected {code.decode()}, read {b''.join(lines) + line!r})")
            lines.append(line)
            if line[3:4] != b"-":
                break
        if not line.startswith(code):
            raise SmtpError(f"after {sent[:60]!r}: expected {code.decode()}, "
                            f"got {b''.join(lines).decode(errors='replace').strip()!r}")
        return lines

    async def exchange(self, *commands: tuple[bytes, bytes]) -> list[bytes]:
        """Send (command, expected code) pairs and check every reply; return the last.

        When the server advertises PIPELINING the commands go out in one write
        (RFC 2920), otherwise one at a time, each after the previous reply.
        """
        pipelining = "PIPELINING" in self.extensions
        if pipelining:
            self.writer.write(b"".join(command for command, _ in commands))
            await self.writer.drain()
        for command, code in commands:
            if not pipelining:
                self.writer.write(command)
                await self.writer.drain()
            reply = await self.expect(code, command)
        return reply

    async def ehlo(self) -> None:
        lines = await self.exchange((b"EHLO bench-client.local\r\n", b"250"))
        self.extensions = {line[4:].split()[0].decode().upper()
                           for line in lines[1:] if line[4:].strip()}

    async def auth(self) -> None:
        token = base64.b64encode(f"\0{USERNAME}\0{PASSWORD}".encode())
        await self.exchange((b"AUTH PLAIN " + token + b"\r\n", b"235"))

    async def send(self, message: Message, latencies: list[float]) -> None:
        """MAIL, RCPT, DATA, the data, its 250; the time from MAIL to 250 goes to ``latencies``."""
        size = f" SIZE={len(message.content)}" if "SIZE" in self.extensions else ""
        start = time.perf_counter()
        await self.exchange((f"MAIL FROM:<{SENDER}>{size}\r\n".encode(), b"250"),
                            (f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"250"),
                            (b"DATA\r\n", b"354"))
        self.writer.write(message.wire)
        await self.writer.drain()
        await self.expect(b"250", b"<end of data>")
        latencies.append(time.perf_counter() - start)

    async def quit(self) -> None:
        await self.exchange((b"QUIT\r\n", b"221"))
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def probe(port: int) -> set[str]:
    """Greeting, EHLO, QUIT; return the EHLO extensions."""
    client = await Client.connect(port)
    await client.ehlo()
    await client.quit()
    return client.extensions


async def session(port: int, authenticate: bool, message: Message | None,
                  count: int, latencies: list[float]) -> None:
    """Connect, EHLO, AUTH PLAIN (or NOOP), ``count`` messages, QUIT."""
    client = await Client.connect(port)
    await client.ehlo()
    if authenticate:
        await client.auth()
    else:
        await client.exchange((b"NOOP\r\n", b"250"))
    for _ in range(count):
        await client.send(message, latencies)
    await client.quit()


@dataclass
class Sample:
    """One measurement: ``batches`` times ``concurrency`` sessions at once."""

    sessions: int
    messages: int
    payload: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def mbps(self) -> float:
        return self.payload / self.seconds / MB

    @property
    def session_rate(self) -> float:
        return self.sessions / self.seconds

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


class WorkloadError(Exception):
    """A measurement failed; the message names the server and what went wrong."""


async def measure(server, *, concurrency: int, batches: int, per_session: int = 0,
                  message: Message | None = None, authenticate: bool = True) -> Sample:
    """Run ``batches`` batches of ``concurrency`` concurrent sessions against ``server``.

    Any failure (reply, connection, WORKLOAD_TIMEOUT, the server dying) raises
    WorkloadError.
    """
    latencies: list[float] = []

    async def run() -> None:
        for _ in range(batches):
            async with asyncio.TaskGroup() as group:
                for _ in range(concurrency):
                    group.create_task(
                        session(server.port, authenticate, message, per_session, latencies))

    start = time.perf_counter()
    try:
        await asyncio.wait_for(run(), WORKLOAD_TIMEOUT)
        seconds = time.perf_counter() - start
        server.check()
    except Exception as exc:
        raise WorkloadError(f"{describe_error(exc)}\n  server: {server.describe()}") from exc
    sessions = concurrency * batches
    payload = len(message.content) * len(latencies) if message else 0
    return Sample(sessions, len(latencies), payload, seconds, latencies)


# --------------------------------------------------------------------------
# Servers: dispatch.py, and aiosmtpd (baseline and upstream sinks)
# --------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


async def wait_ready(port: int, alive, describe) -> set[str]:
    """Poll until the server on ``port`` greets with 220 and answers EHLO; return its extensions."""
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        if not alive():
            raise RuntimeError(f"exited before it was ready: {describe()}")
        try:
            return await asyncio.wait_for(probe(port), 2)
        except (OSError, SmtpError, asyncio.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {READY_DEADLINE:.0f} s ({exc}): "
                                   f"{describe()}") from exc
        await asyncio.sleep(0.05)


class RelayProcess:
    """``python dispatch.py`` in a subprocess, configured by environment variables."""

    def __init__(self, script: Path, password_hash: bytes, upstream_port: int,
                 workdir: str, **settings: str):
        self.port = free_port()
        self.script = script
        self.log_path = Path(workdir) / f"dispatch-{self.port}.log"
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("RELAY_", "UPSTREAM_", "DISPATCH_"))}
        env.update(RELAY_BIND=HOST, RELAY_PORT=str(self.port), RELAY_HOST=RELAY_NAME,
                   RELAY_USERNAME=USERNAME, RELAY_PASSWORD=password_hash.decode(),
                   UPSTREAM_HOST=HOST, UPSTREAM_PORT=str(upstream_port), UPSTREAM_TLS="none",
                   DISPATCH_INTERVAL="3600", RELAY_MAX_SIZE=str(MAX_SIZE),
                   DISPATCH_MAX_QUEUE="2000000000", LOG_LEVEL="WARNING")
        env.update(settings)
        self.env = env
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.extensions: set[str] = set()

    async def start(self) -> RelayProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, str(self.script)], env=self.env,
                                            cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        self.extensions = await wait_ready(self.port, self.alive, self.describe)
        return self

    def alive(self) -> bool:
        return self.process.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError("the relay died")

    def describe(self) -> str:
        text = self.log_path.read_text(errors="replace").strip() if self.log_path.exists() else ""
        state = "running" if self.alive() else f"exit status {self.process.returncode}"
        tail = "\n    ".join(text.splitlines()[-15:])
        output = f"; its output:\n    {tail}" if tail else ""
        return f"dispatch on port {self.port} ({state}){output}"

    def status(self, field: str) -> int:
        """A memory figure of /proc/<pid>/status, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self) -> None:
        """Reset VmHWM to the current RSS (Linux 4.0+)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def kill(self) -> None:
        if self.process and self.alive():
            self.process.kill()
            self.process.wait()


class Tally:
    """What an aiosmtpd process received, in shared memory the bench reads."""

    def __init__(self, context):
        self.received = context.RawValue("q", 0)          # messages
        self.last_arrival = context.RawValue("d", 0.0)    # time.monotonic() of the last one
        self.last_digest = context.RawArray("c", 32)      # SHA-256 of the last one's content


class KeepHandler:
    """aiosmtpd handler: keeps every message in memory and keeps the tally."""

    def __init__(self, tally: Tally):
        self.messages: list[bytes] = []
        self.tally = tally

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope.content)
        self.tally.last_digest.raw = hashlib.sha256(envelope.content).digest()
        self.tally.last_arrival.value = time.monotonic()
        self.tally.received.value += 1
        return "250 OK"


class PipeliningHandler(KeepHandler):
    """KeepHandler that also advertises PIPELINING: aiosmtpd handles pipelined input but
    does not say so."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING", responses[-1]]


class CachedBcrypt:
    """aiosmtpd authenticator: bcrypt.checkpw once, then the success is remembered in memory."""

    def __init__(self, username: str, password_hash: bytes):
        self.username = username.encode()
        self.password_hash = password_hash
        self.seen: set[bytes] = set()

    def __call__(self, server, session, envelope, mechanism, auth_data):
        login, password = auth_data.login, auth_data.password
        ok = login == self.username and (
            password in self.seen or bcrypt.checkpw(password, self.password_hash))
        if ok:
            self.seen.add(password)
        return AuthResult(success=ok, handled=False)


def serve_aiosmtpd(port: int, password_hash: bytes | None, pipelining: bool, tally: Tally) -> None:
    """Child process body: an aiosmtpd Controller until killed; AUTH required with a hash."""
    warnings.simplefilter("ignore")              # "AUTH without TLS" warns once per session
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    handler = (PipeliningHandler if pipelining else KeepHandler)(tally)
    options = {}
    if password_hash:
        options = dict(auth_required=True, authenticator=CachedBcrypt(USERNAME, password_hash))
    controller = Controller(handler, hostname=HOST, port=port, server_hostname=RELAY_NAME,
                            data_size_limit=MAX_SIZE, auth_require_tls=False, **options)
    controller.start()
    threading.Event().wait()


class AiosmtpdProcess:
    """An aiosmtpd server in its own process: it does not share the GIL with the load generator."""

    def __init__(self, name: str, *, password_hash: bytes | None = None, pipelining: bool = False):
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.port = free_port()
        self.tally = Tally(context)
        self.process = context.Process(target=serve_aiosmtpd, daemon=True, name=name,
                                       args=(self.port, password_hash, pipelining, self.tally))
        self.extensions: set[str] = set()

    async def start(self) -> AiosmtpdProcess:
        self.process.start()
        self.extensions = await wait_ready(self.port, self.process.is_alive, self.describe)
        return self

    def describe(self) -> str:
        return f"aiosmtpd {self.name} on port {self.port}"

    def check(self) -> None:
        if not self.process.is_alive():
            raise RuntimeError("the server died")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


# --------------------------------------------------------------------------
# Delay proxy
# --------------------------------------------------------------------------

class DelayProxy:
    """TCP proxy that holds every chunk ``delay`` seconds in each direction, order preserved.

    A new connection waits one round trip before the upstream side is opened,
    standing in for the TCP handshake a real remote server costs.  Threads and
    time.sleep rather than asyncio: asyncio's epoll timeouts round up to whole
    milliseconds, which would add up to 1 ms to every 10 ms delay.

    It also counts the client's flights: sends that follow data from the
    upstream (each waits for the upstream, so each costs a round trip
    whatever the CPU load), the protocol's side of the timed figure.
    """

    def __init__(self, target_port: int, delay: float = ONE_WAY_DELAY):
        self.target_port = target_port
        self.delay = delay
        self.accepted: list[float] = []       # time.monotonic() of each connection
        self.flights = 0
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                self.accepted.append(time.monotonic())
                self.sockets.append(client)
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        time.sleep(2 * self.delay)
        try:
            upstream = socket.create_connection((HOST, self.target_port))
        except OSError:
            client.close()
            return
        self.sockets.append(upstream)
        for sock in (client, upstream):       # forward at once, as asyncio's transports do
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        last_sender = [upstream]              # the upstream speaks first: its greeting
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, daemon=True,
                             args=(source, target, last_sender, source is client)).start()

    def _pipe(self, source: socket.socket, target: socket.socket,
              last_sender: list[socket.socket], from_client: bool) -> None:
        """Copy source to target, each chunk (and the end of stream) ``delay`` seconds late."""
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def deliver() -> None:
            with contextlib.suppress(OSError):
                while True:
                    due, chunk = chunks.get()
                    time.sleep(max(0.0, due - time.monotonic()))
                    if not chunk:
                        target.shutdown(socket.SHUT_WR)
                        return
                    target.sendall(chunk)

        threading.Thread(target=deliver, daemon=True).start()
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                if last_sender[0] is not source:      # the other side spoke last
                    last_sender[0] = source
                    self.flights += from_client
                chunks.put((time.monotonic() + self.delay, chunk))
        chunks.put((time.monotonic() + self.delay, b""))


# --------------------------------------------------------------------------
# Reporting helpers
# --------------------------------------------------------------------------

@dataclass
class Figure:
    """One line of the final summary."""

    label: str
    measured: str
    target: str
    verdict: str            # PASS, FAIL, ERROR or info


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def describe_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    if isinstance(exc, WorkloadError):
        return str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return f"timed out after {WORKLOAD_TIMEOUT:.0f} s"
    return f"{type(exc).__name__}: {exc}"


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------
# Throughput: workloads (a), (b), (c)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    label: str              # for the summary
    concurrency: int
    batches: int
    per_session: int
    size: int
    unit: str               # "msg/s" or "MB/s"
    target: float           # minimum dispatch/aiosmtpd ratio of the medians

    def figure(self, sample: Sample) -> float:
        return sample.mbps if self.unit == "MB/s" else sample.rate


def workloads(quick: bool) -> list[Workload]:
    """SPEC section 4's three workloads, each repeated enough to measure more than noise."""
    return [
        Workload("a", "20 concurrent sessions of one 10 KB message",
                 "(a) 20 sessions x 1 x 10 KB",
                 concurrency=20, batches=10 if quick else 50, per_session=1, size=10 * KB,
                 unit="msg/s", target=1.4),
        Workload("b", "8 concurrent sessions of 50 messages of 10 KB",
                 "(b) 8 sessions x 50 x 10 KB",
                 concurrency=8, batches=2 if quick else 5, per_session=50, size=10 * KB,
                 unit="msg/s", target=3.5),
        Workload("c", "one session of one 5 MB message",
                 "(c) 1 session x 1 x 5 MB",
                 concurrency=1, batches=3 if quick else 10, per_session=1, size=5 * MB,
                 unit="MB/s", target=3.5),
    ]


def print_workload(workload: Workload, results: dict[str, list[Sample]]) -> Figure:
    """The per-round table of one workload and its dispatch/aiosmtpd verdict."""
    first = next(iter(results.values()))[0]
    say(f"\n({workload.key}) {workload.title}: {first.sessions} sessions, "
        f"{first.messages} messages per round")
    say(f"  {'server':<10}{'round':>8}{workload.unit:>12}{'p50 ms':>10}{'p99 ms':>10}")
    medians = {}
    for server, samples in results.items():
        rows = [(str(number), workload.figure(s), s.percentile_ms(0.50), s.percentile_ms(0.99))
                for number, s in enumerate(samples, 1)]
        medians[server] = statistics.median(row[1] for row in rows)
        rows.append(("median", medians[server], statistics.median(row[2] for row in rows),
                     statistics.median(row[3] for row in rows)))
        for label, value, p50, p99 in rows:
            say(f"  {server:<10}{label:>8}{value:>12.1f}{p50:>10.2f}{p99:>10.2f}")
    ratio = medians["dispatch"] / medians["aiosmtpd"]
    result = verdict(ratio >= workload.target)
    say(f"  dispatch/aiosmtpd (medians of {workload.unit}): {ratio:.2f}x   "
        f"target >= {workload.target}x   {result}")
    return Figure(f"{workload.label}: {workload.unit}, dispatch / aiosmtpd",
                  f"{ratio:.2f}x", f">= {workload.target}x", result)


async def throughput(relay: RelayProcess, baseline: AiosmtpdProcess, rounds: int,
                     quick: bool, figures: list[Figure]) -> None:
    """Workloads (a), (b), (c), interleaved over rounds; the server order alternates per round."""
    servers = {"dispatch": relay, "aiosmtpd": baseline}
    plan = workloads(quick)
    messages = {size: make_message(size) for size in {w.size for w in plan}}
    for server in servers.values():       # one session pays bcrypt, then a warm-up batch
        await measure(server, concurrency=1, batches=1)
        await measure(server, concurrency=20, batches=1, per_session=5, message=messages[10 * KB])
    results = {w.key: {name: [] for name in servers} for w in plan}
    for number in range(rounds):
        order = list(servers) if number % 2 == 0 else list(servers)[::-1]
        for workload in plan:
            progress = []
            for name in order:
                try:
                    sample = await measure(servers[name], concurrency=workload.concurrency,
                                           batches=workload.batches,
                                           per_session=workload.per_session,
                                           message=messages[workload.size])
                except WorkloadError as exc:
                    raise WorkloadError(f"({workload.key}) round {number + 1}: {exc}") from exc
                results[workload.key][name].append(sample)
                progress.append(f"{name} {workload.figure(sample):.1f}")
            say(f"  round {number + 1}/{rounds} ({workload.key}) {workload.unit}: "
                + ", ".join(progress))
    for workload in plan:
        figures.append(print_workload(workload, results[workload.key]))


# --------------------------------------------------------------------------
# (d) Auth cost
# --------------------------------------------------------------------------

async def auth_cost(relay: RelayProcess, rounds: int, quick: bool, figures: list[Figure]) -> None:
    """Sessions EHLO + AUTH PLAIN + QUIT against EHLO + NOOP + QUIT, 20 at a time, on dispatch.

    Within a round the two kinds alternate batch by batch, so that background
    load hits both alike, and a round's rate comes from the median batch, so
    that a burst of it does not decide the figure.
    """
    batches = 10 if quick else 25
    kinds = {"NOOP": False, "AUTH": True}
    rates = {kind: [] for kind in kinds}
    await measure(relay, concurrency=1, batches=1)          # the password is seen once
    for number in range(rounds):
        seconds = {kind: [] for kind in kinds}
        for batch in range(batches):
            for kind in list(kinds) if (number + batch) % 2 == 0 else list(kinds)[::-1]:
                sample = await measure(relay, concurrency=20, batches=1,
                                       authenticate=kinds[kind])
                seconds[kind].append(sample.seconds)
        for kind in kinds:
            rates[kind].append(20 / statistics.median(seconds[kind]))
        say(f"  round {number + 1}/{rounds} (d) sessions/s: "
            + ", ".join(f"{kind} {rates[kind][-1]:.1f}" for kind in kinds))
    say(f"\n(d) auth cost on dispatch: {batches} batches of 20 concurrent sessions of each kind "
        "per round, alternating,\n    EHLO + (NOOP or AUTH PLAIN) + QUIT, password already seen")
    say(f"  {'session':<10}{'round':>8}{'sessions/s':>12}   (20 / median batch time)")
    for kind, values in rates.items():
        for label, value in [*((str(n), v) for n, v in enumerate(values, 1)),
                             ("median", statistics.median(values))]:
            say(f"  {kind:<10}{label:>8}{value:>12.1f}")
    ratio = statistics.median(rates["NOOP"]) / statistics.median(rates["AUTH"])
    result = verdict(ratio <= TARGET_AUTH_COST)
    say(f"  cost of an AUTH session / a NOOP session (medians): {ratio:.2f}x   "
        f"target <= {TARGET_AUTH_COST}x   {result}")
    figures.append(Figure("(d) auth cost: AUTH session / NOOP session", f"{ratio:.2f}x",
                          f"<= {TARGET_AUTH_COST}x", result))


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------

async def memory(relay: RelayProcess, figures: list[Figure]) -> None:
    """RSS growth of a fresh relay for 10,000 queued 10 KB messages; its peak during one 10 MB
    message."""
    message = make_message(10 * KB)
    await measure(relay, concurrency=8, batches=1, per_session=25, message=message)
    await asyncio.sleep(0.5)
    before = relay.status("VmRSS")
    sample = await measure(relay, concurrency=8, batches=1,
                           per_session=MEMORY_MESSAGES // 8, message=message)
    await asyncio.sleep(0.5)
    after = relay.status("VmRSS")
    ratio = (after - before) / sample.payload
    result = verdict(ratio <= TARGET_MEMORY)
    say(f"\nmemory: {sample.messages} messages of 10 KB queued ({sample.payload / MB:.1f} MB "
        f"payload, {sample.rate:.0f} msg/s)")
    say(f"  VmRSS {before / MB:.1f} MB -> {after / MB:.1f} MB: growth / payload = {ratio:.3f}x   "
        f"target <= {TARGET_MEMORY}x   {result}")
    figures.append(Figure(f"memory: RSS growth / payload, {sample.messages} x 10 KB queued",
                          f"{ratio:.3f}x", f"<= {TARGET_MEMORY}x", result))

    big = make_message(10 * MB, seed=2)
    relay.reset_peak()
    base = relay.status("VmRSS")
    await measure(relay, concurrency=1, batches=1, per_session=1, message=big)
    peak = relay.status("VmHWM")
    ratio = (peak - base) / len(big.content)
    say(f"  one 10 MB message: VmRSS before {base / MB:.1f} MB, peak (VmHWM) {peak / MB:.1f} MB: "
        f"peak growth / size = {ratio:.2f}x (info)")
    figures.append(Figure("memory: peak RSS growth / size, one 10 MB message",
                          f"{ratio:.2f}x", "-", "info"))


# --------------------------------------------------------------------------
# Flush round trips
# --------------------------------------------------------------------------

@dataclass
class Flush:
    """Messages sent to an upstream ROUND_TRIP away, through a DelayProxy; figures per message."""

    round_trips: float              # by the clock: wall time / ROUND_TRIP / messages
    flights: float                  # the client's flights, counted by the proxy
    connections: int
    sigterm_to_connect: float = 0.0     # dispatch: seconds from SIGTERM to the upstream connection


async def flush_round_trips(script: Path, password_hash: bytes, workdir: str,
                            sink: AiosmtpdProcess, count: int) -> Flush:
    """Queue ``count`` messages in a fresh relay whose upstream is ``sink`` behind the proxy,
    SIGTERM it, and time its flush: from the upstream connection to the last message."""
    proxy = DelayProxy(sink.port)
    relay = RelayProcess(script, password_hash, proxy.port, workdir,
                         DISPATCH_DRAIN_TIMEOUT=str(int(DRAIN_DEADLINE)))
    tally = sink.tally
    message = make_message(10 * KB)
    try:
        await relay.start()
        await measure(relay, concurrency=1, batches=1, per_session=count, message=message)
        goal = tally.received.value + count
        sigterm = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        deadline = sigterm + DRAIN_DEADLINE
        while tally.received.value < goal:
            if not relay.alive():          # what it sent is at the sink within a second
                deadline = min(deadline, time.monotonic() + 1.0)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink got {count - goal + tally.received.value} of {count} "
                                   f"messages after SIGTERM: {relay.describe()}")
            await asyncio.sleep(0.005)
        wall = tally.last_arrival.value - proxy.accepted[0]
        if tally.last_digest.raw != hashlib.sha256(message.content).digest():
            raise RuntimeError("the upstream received other bytes than the client sent "
                               "(SPEC section 3: unchanged after dot-unstuffing)")
        status = await asyncio.to_thread(relay.process.wait, DRAIN_DEADLINE)
        if status != 0:
            raise RuntimeError(f"after its flush, {relay.describe()} (SPEC: exit 0)")
        if tally.received.value != goal:
            raise RuntimeError(f"the sink got {count - goal + tally.received.value} messages "
                               f"for {count} queued")
        return Flush(wall / ROUND_TRIP / count, proxy.flights / count, len(proxy.accepted),
                     proxy.accepted[0] - sigterm)
    finally:
        relay.kill()
        proxy.close()


async def one_connection_per_message(sink: AiosmtpdProcess, count: int) -> Flush:
    """smtplib sending each message on its own connection through the proxy."""
    proxy = DelayProxy(sink.port)
    content = make_message(10 * KB).content

    def send_all() -> None:
        for _ in range(count):
            with smtplib.SMTP(HOST, proxy.port, local_hostname=RELAY_NAME, timeout=30) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT], content)

    try:
        start = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(send_all), WORKLOAD_TIMEOUT)
        wall = time.monotonic() - start
        return Flush(wall / ROUND_TRIP / count, proxy.flights / count, len(proxy.accepted))
    finally:
        proxy.close()


async def flushing(script: Path, password_hash: bytes, workdir: str, quick: bool,
                   piped_sink: AiosmtpdProcess, plain_sink: AiosmtpdProcess,
                   figures: list[Figure]) -> None:
    """Round trips per message: dispatch's flush with and without PIPELINING, and smtplib."""
    comparison = 20 if quick else 50
    say(f"\nflush: upstream {ROUND_TRIP * 1000:.0f} ms away (proxy: {ONE_WAY_DELAY * 1000:.0f} ms "
        "each way, one round trip before it connects). Per message: round trips by the clock\n"
        f"(wall time / {ROUND_TRIP * 1000:.0f} ms), and the client's flights counted by the proxy "
        "(sends that wait for the upstream: the protocol's share, immune to CPU load)")
    runs = [
        (f"dispatch, {FLUSH_MESSAGES} messages, upstream with PIPELINING",
         await flush_round_trips(script, password_hash, workdir, piped_sink, FLUSH_MESSAGES)),
        (f"dispatch, {comparison} messages, upstream without PIPELINING",
         await flush_round_trips(script, password_hash, workdir, plain_sink, comparison)),
        (f"smtplib, {comparison} messages, one connection per message",
         await one_connection_per_message(piped_sink, comparison)),
    ]
    first = runs[0][1]
    result = verdict(first.round_trips <= TARGET_FLUSH_ROUND_TRIPS)
    outcomes = [f"target <= {TARGET_FLUSH_ROUND_TRIPS}   {result}", "(info)", "(info)"]
    for (label, flush), outcome in zip(runs, outcomes):
        say(f"  {label + ':':<60}{flush.round_trips:6.2f} by the clock,{flush.flights:6.2f} "
            f"flights   {outcome}")
    say(f"    (dispatch: {first.connections} upstream connection(s), the first opened "
        f"{first.sigterm_to_connect * 1000:.0f} ms after SIGTERM)")
    figures += [
        Figure(f"flush: round trips / msg, {FLUSH_MESSAGES} x 10 KB, PIPELINING",
               f"{first.round_trips:.2f}", f"<= {TARGET_FLUSH_ROUND_TRIPS}", result),
        Figure("flush: client flights / msg counted by the proxy, PIPELINING",
               f"{first.flights:.2f}", "-", "info"),
        Figure(f"flush: round trips / msg, {comparison} x 10 KB, no PIPELINING",
               f"{runs[1][1].round_trips:.2f}", "-", "info"),
        Figure("smtplib: round trips / msg, one connection each",
               f"{runs[2][1].round_trips:.2f}", "about 9", "info"),
    ]


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

async def bench(args: argparse.Namespace) -> int:
    """Run every section; an error ends its section only. Return the exit status."""
    figures: list[Figure] = []
    errors: list[str] = []
    started: list[RelayProcess | AiosmtpdProcess] = []      # all killed in the finally

    async def start(server):
        started.append(server)
        return await server.start()

    async def section(name: str, body) -> None:
        try:
            await body()
        except Exception as exc:                          # reported, then exit status 1
            message = describe_error(exc)
            errors.append(f"{name}: {message}")
            figures.append(Figure(name, "-", "-", "ERROR"))
            say(f"\n!!! {name} FAILED: {message}")

    say(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; "
        "hashing the bench password with bcrypt (default cost 12)")
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt())
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as workdir:
        try:
            piped_sink = await start(AiosmtpdProcess("sink with PIPELINING", pipelining=True))
            plain_sink = await start(AiosmtpdProcess("sink without PIPELINING"))
            baseline = await start(AiosmtpdProcess("baseline", password_hash=password_hash,
                                                   pipelining=args.baseline_pipelining))

            def fresh_relay() -> RelayProcess:
                return RelayProcess(args.relay, password_hash, piped_sink.port, workdir)

            async def throughput_and_auth() -> None:
                relay = await start(fresh_relay())
                for name, server in (("dispatch", relay), ("aiosmtpd", baseline)):
                    pipelining = "PIPELINING" in server.extensions
                    say(f"{name} advertises PIPELINING: {'yes' if pipelining else 'no'}"
                        + ("" if pipelining else ", so the load generator sends it one command "
                                                 "at a time"))
                say(f"\nthroughput, {args.rounds} rounds:")
                await throughput(relay, baseline, args.rounds, args.quick, figures)
                say(f"\nauth cost, {args.rounds} rounds:")
                await auth_cost(relay, args.rounds, args.quick, figures)
                relay.kill()

            async def memory_section() -> None:
                relay = await start(fresh_relay())
                await memory(relay, figures)
                relay.kill()

            await section("throughput and auth cost", throughput_and_auth)
            await section("memory", memory_section)
            await section("flush round trips", lambda: flushing(
                args.relay, password_hash, workdir, args.quick, piped_sink, plain_sink, figures))
        finally:
            for server in started:
                server.kill()

    say("\n" + "=" * 96)
    say(f"SUMMARY (SPEC.md section 4), load average {os.getloadavg()[0]:.2f} at the end")
    say(f"  {'figure':<62}{'measured':>10}{'target':>11}  result")
    for figure in figures:
        say(f"  {figure.label:<62}{figure.measured:>10}{figure.target:>11}  {figure.verdict}")
    for error in errors:
        say(f"  ERROR {error.splitlines()[0]}")
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, about a minute")
    parser.add_argument("--relay", type=Path,
                        default=Path(__file__).resolve().with_name("dispatch.py"),
                        help="the relay script to run (default: dispatch.py next to this file)")
    parser.add_argument("--baseline-pipelining", action="store_true",
                        help="make the aiosmtpd baseline advertise PIPELINING "
                             "(stock aiosmtpd does not)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args.relay.is_file():
        parser.error(f"no relay script at {args.relay}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))     # so the finally blocks kill children
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
