"""Tests for Dispatch, in the order of dispatch.py's sections.

Everything runs on real sockets on 127.0.0.1: the relay (in this process, or
as a real `dispatch.py` process where the process matters), Python's smtplib
or a raw socket as the client, and aiosmtpd as an independent upstream.
Nothing waits with a bare sleep: `wait_for` polls a condition with a deadline.
"""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Upstream:
    """A real SMTP server (aiosmtpd) standing in for the provider."""

    def __init__(self, port=None, auth=True, pipelining=True, **kwargs):
        self.handler = UpstreamHandler(pipelining=pipelining)
        self.port = port or free_port()
        self.logins = []
        options = dict(auth_require_tls=False, enable_SMTPUTF8=True)
        if auth:
            options.update(authenticator=self.authenticate, auth_required=True)
        options.update(kwargs)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     **options)
        self.password = UPSTREAM_PASS
        self.controller.start()

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append(mechanism)
        ok = (auth_data.login.decode() == UPSTREAM_USER
              and auth_data.password.decode() == self.password)
        return AuthResult(success=ok)

    @property
    def received(self):
        return self.handler.received

    def wait_received(self, count, timeout=10.0):
        wait_for(lambda: len(self.received) >= count, timeout,
                 f"{count} message(s) at the upstream")
        return self.received[:count]

    def stop(self):
        self.controller.stop()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.stop()


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
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
        self.expect(235, b"AUTH PLAIN " + token + b"\r\n")

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


MESSAGE = (b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: hello\r\n\r\n"
           b"Hello Bob.\r\n.a line that starts with a dot\r\n..two dots\r\nBye.\r\n")


class RelayProcess:
    """A real `python dispatch.py` process, its log in a file."""

    def __init__(self, env, tmp_path, args=(), wait=True):
        self.env = env
        self.port = int(env["RELAY_PORT"])
        self.log_path = tmp_path / f"dispatch-{self.port}-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "wb")
        child_env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("RELAY_", "UPSTREAM_", "DISPATCH_"))}
        child_env.update(env)
        self.proc = subprocess.Popen([sys.executable, str(DISPATCH), *args], env=child_env,
                                     stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     stdin=subprocess.DEVNULL)
        if wait:
            wait_for(self.ready, 15, "the relay to greet")

    def ready(self):
        if self.proc.poll() is not None:
            pytest.fail(f"dispatch.py exited {self.proc.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                return s.recv(64).startswith(b"220")
        except OSError:
            return False

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

    def start(env, args=(), wait=True):
        process = RelayProcess(env, tmp_path, args, wait)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop()


def run_cli(*args, env=None, input=None, timeout=30):
    """Run dispatch.py to completion: (exit status, stdout, stderr)."""
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("RELAY_", "UPSTREAM_", "DISPATCH_"))}
    child_env.update(env or {})
    done = subprocess.run([sys.executable, str(DISPATCH), *args], env=child_env, input=input,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


# ===========================================================================
# 1. Configuration and command line
# ===========================================================================


def base_process_env(upstream_port=2):
    return relay_env(upstream_port)


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
])
def test_bad_configuration_stops_with_one_line_naming_the_variable(change, variable):
    env = base_process_env()
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
    env = base_process_env()
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


def test_env_file_is_loaded_and_the_environment_wins(tmp_path, upstream, run_relay):
    env = relay_env(upstream.port)
    port = env.pop("RELAY_PORT")
    env_file = tmp_path / "relay.env"
    env_file.write_text(f"# comment\nexport RELAY_PORT={port}\nRELAY_HOST='from-file.test'\n")
    env["RELAY_HOST"] = "from-environment.test"
    env["RELAY_PORT"] = port
    process = run_relay(env, args=["--env-file", str(env_file)])
    with smtplib.SMTP("127.0.0.1", process.port, timeout=10) as smtp:
        assert smtp.ehlo()[1].decode().startswith("from-environment.test")
    env_file.write_text(f"RELAY_PORT={port}\n")


def test_env_file_supplies_missing_variables(tmp_path, upstream, run_relay):
    env = relay_env(upstream.port)
    port = env.pop("RELAY_PORT")
    (tmp_path / "relay.env").write_text(f"RELAY_PORT={port}\n")
    env["RELAY_PORT"] = ""
    process_env = dict(env, RELAY_PORT=port)
    process = run_relay(process_env, args=["--env-file", str(tmp_path / "relay.env")])
    assert process.ready()


def test_unreadable_env_file_is_a_one_line_error(tmp_path):
    status, out, err = run_cli("--env-file", str(tmp_path / "missing.env"),
                               env=base_process_env())
    assert status == 2 and "--env-file" in err and len(err.strip().splitlines()) == 1


def test_example_env_is_a_valid_configuration():
    environ = {}
    dispatch.load_env_file(str(HERE / "example.env"), environ)
    config = dispatch.Config.from_env(environ)
    assert bcrypt.checkpw(b"secret", config.password_hash)
    assert config.port == 2525 and config.upstream_tls == "none"


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
    raw.expect(235, b"AUTH PLAIN " + base64.b64encode(f"{USER}\0{USER}\0{PASSWORD}".encode())
               + b"\r\n")


def test_auth_plain_with_another_authorization_identity_is_refused(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(535, b"AUTH PLAIN " + base64.b64encode(f"admin\0{USER}\0{PASSWORD}".encode())
               + b"\r\n")


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
    text = raw.expect(535, b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode())
                      + b"\r\n")
    assert text.startswith("535 5.7.8")
    raw.expect(530, b"MAIL FROM:<a@example.com>\r\n")


def test_wrong_username_is_535(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(535, b"AUTH PLAIN " + base64.b64encode(f"\0other\0{PASSWORD}".encode())
               + b"\r\n")


def test_auth_cancelled_with_star_is_501_and_mail_still_needs_auth(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    raw.expect(334, b"AUTH LOGIN\r\n")
    raw.expect(501, b"*\r\n")
    raw.expect(530, b"MAIL FROM:<a@example.com>\r\n")
    raw.login_done = False
    raw.expect(235, b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
               + b"\r\n")


def test_bad_base64_is_501_5_5_2(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    assert raw.expect(501, b"AUTH PLAIN not*base64!\r\n").startswith("501 5.5.2")
    raw.expect(250, b"NOOP\r\n")


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
    bad = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode()) + b"\r\n"
    raw.expect(535, bad)
    raw.expect(501, b"AUTH PLAIN ***\r\n")
    raw.expect(535, bad)
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
    raw.expect(535, b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode()) + b"\r\n")
    assert len(calls) == 2              # a wrong password always pays bcrypt


def test_a_message_is_queued_with_a_queue_id(relay, upstream):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<alice@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<bob@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
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
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
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
    line = b"MAIL FROM:<" + b"a" * 500 + b"@example.com>\r\n"
    assert raw.expect(500, line).startswith("500 5.5.2")
    raw.expect(500, b"NOOP " + b"x" * 20000 + b"\r\n")      # even past the AUTH limit
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")


def test_an_auth_line_may_be_longer_than_512_bytes(relay):
    raw = Raw(relay.port)
    raw.expect(250, b"EHLO client.test\r\n")
    long_token = base64.b64encode(b"\0" + USER.encode() + b"\0" + b"p" * 1000)
    raw.expect(535, b"AUTH PLAIN " + long_token + b"\r\n")   # refused for the password only


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
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
    raw.expect(250, b"..leading dot\r\nmiddle\r\n...\r\n.\r\n")
    assert relay_stored_or_sent(upstream) == b".leading dot\r\nmiddle\r\n..\r\n"


def relay_stored_or_sent(upstream):
    """The data the upstream received for the first message."""
    return upstream.wait_received(1)[0].data


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_only_crlf_dot_crlf_ends_the_data_so_smuggling_is_impossible(relay, upstream, smuggle):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
    raw.send(b"Subject: one\r\n\r\nfirst" + smuggle + b"MAIL FROM:<evil@example.com>\r\n"
             b"RCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    text = raw.expect(250)
    assert "queued as" in text
    raw.expect(250, b"NOOP\r\n")          # exactly one reply came for all of it
    got = upstream.wait_received(1)
    assert len(relay.queue) == 0 and len(upstream.received) == 1
    assert got[0].recipients == ["b@example.com"]
    # Every line reaches the upstream ended by CRLF: no bare CR or LF survives.
    data = got[0].data
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    assert b"MAIL FROM:<evil@example.com>" in data


def test_bare_line_ends_are_stored_as_crlf(relay, upstream):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
    raw.expect(250, b"a\nb\rc\r\n.\r\n")
    assert relay_stored_or_sent(upstream) == b"a\r\nb\r\nc\r\n"


def test_an_empty_message_is_accepted(relay, upstream):
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
    raw.expect(250, b".\r\n")
    upstream.wait_received(1)


def test_long_text_lines_are_data_not_errors(relay, upstream):
    body = b"Subject: long\r\n\r\n" + b"z" * 200_000 + b"\r\n"
    raw = Raw(relay.port)
    raw.login()
    raw.expect(250, b"MAIL FROM:<a@example.com>\r\n")
    raw.expect(250, b"RCPT TO:<b@example.com>\r\n")
    raw.expect(354, b"DATA\r\n")
    raw.expect(250, body + b".\r\n")
    assert relay.queue.bytes == len(body) or len(upstream.received) == 1 or wait_for(
        lambda: relay.metrics.counters["accepted"] == 1)


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
    with smtplib.SMTP("127.0.0.1", first.port, timeout=10) as smtp:
        smtp.noop()
    first.signal(signal.SIGKILL)
    first.wait()
    second = run_relay(env)
    assert second.ready()


# ===========================================================================
# 3. The queue and the upstream
# ===========================================================================


def test_messages_arrive_at_the_upstream_byte_for_byte(relay, upstream):
    with client(relay) as smtp:
        send_message(smtp, MESSAGE, to=["bob@example.com", "carol@example.com"])
    got = upstream.wait_received(1)[0]
    assert got.data == MESSAGE
    assert got.sender == "alice@example.com"
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


def test_the_timer_flushes_every_interval(make_relay, upstream):
    relay = make_relay(DISPATCH_INTERVAL="0.2")
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    upstream.wait_received(1)
    with client(relay) as smtp:
        send_message(smtp, MESSAGE)
    upstream.wait_received(2)


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


def test_no_auth_is_sent_when_upstream_user_is_unset(make_relay):
    open_upstream = Upstream(auth=False)
    try:
        relay = make_relay(upstream_port=open_upstream.port, UPSTREAM_USER="", UPSTREAM_PASS="")
        with client(relay) as smtp:
            send_message(smtp, MESSAGE)
        open_upstream.wait_received(1)
        assert open_upstream.logins == []
    finally:
        open_upstream.stop()


def test_auth_login_is_used_when_the_upstream_offers_only_that(make_relay):
    login_only = Upstream(auth_exclude_mechanism=["PLAIN"])
    try:
        relay = make_relay(upstream_port=login_only.port)
        with client(relay) as smtp:
            send_message(smtp, MESSAGE)
        login_only.wait_received(1)
        assert login_only.logins == ["LOGIN"]
    finally:
        login_only.stop()


def test_an_unreachable_upstream_leaves_the_message_queued(make_relay, upstream, caplog):
    relay = make_relay(upstream_port=free_port(), DISPATCH_INTERVAL=3600)
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
    text = "\n".join(r.getMessage() for r in caplog.records)
    accepted = [r.getMessage() for r in caplog.records if "accepted from=" in r.getMessage()]
    queue_id = accepted[0].split(":")[0]
    assert f"nrcpt=1, size={len(MESSAGE)}, client=127.0.0.1:" in accepted[0]
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
