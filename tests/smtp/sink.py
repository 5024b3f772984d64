"""A real SMTP server for Herald's e-mail tests (aiosmtpd), with scripted refusals.

    python3 tests/smtp/sink.py --out /tmp/mail.jsonl [--port 0] [--host 127.0.0.1] [--refuse-auth]
        [--tls none|starttls|implicit]

Listens on the port (0: a free one), then prints `READY <port>` on stdout. Every RCPT and
every message received is appended to --out as one JSON line:

    {"event": "rcpt", "address": "...", "answer": "250 OK"}
    {"event": "message", "mail_from": "...", "rcpt_tos": [...], "raw": "...",
     "headers": {"Message-ID": "...", ...}, "parts": [{"content_type": "text/plain", "body": "..."}]}

With --tls starttls (STARTTLS required before MAIL) or --tls implicit (TLS from the first
byte), the server makes itself a private CA and a certificate for `localhost` with the openssl
command and writes the CA's certificate to `<out>.ca.pem` before saying READY.

With --refuse-auth the server offers AUTH (without TLS) and refuses every credential with
`535 5.7.8 Authentication credentials invalid`. Scripted answers at RCPT: `nobody@…` gets `550 5.1.1 No such user`; the first RCPT to each
`busy@…` address gets `451 4.3.0 try later`, later ones are accepted. The server exits when its
standard input closes (the test that started it has ended) or on SIGTERM.
"""

import argparse
import asyncio
import email
import email.policy
import json
import os
import ssl
import subprocess
import sys
import tempfile
import threading

from aiosmtpd.smtp import SMTP, AuthResult


class Handler:
    def __init__(self, out):
        self.out = out
        self.busy_seen = set()
        self.lock = threading.Lock()

    def record(self, event):
        line = json.dumps(event, ensure_ascii=False)
        with self.lock, open(self.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local == "nobody":
            answer = "550 5.1.1 No such user"
        elif local == "busy" and address not in self.busy_seen:
            self.busy_seen.add(address)
            answer = "451 4.3.0 try later"
        else:
            envelope.rcpt_tos.append(address)
            answer = "250 OK"
        self.record({"event": "rcpt", "address": address, "answer": answer})
        return answer

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        message = email.message_from_bytes(raw, policy=email.policy.default)
        parts = []
        for part in message.walk():
            if part.is_multipart():
                continue
            parts.append({"content_type": part.get_content_type(), "body": part.get_content()})
        self.record(
            {
                "event": "message",
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "raw": raw.decode("utf-8", "replace"),
                "content_type": message.get_content_type(),
                "headers": {name: str(value) for name, value in message.items()},
                "parts": parts,
            }
        )
        return "250 2.0.0 Ok: queued"


def make_certificates(ca_out):
    """A CA (written to ca_out) and a `localhost` server certificate it signed; the server's
    SSL context."""
    work = tempfile.mkdtemp(prefix="herald-smtp-tls-")
    path = lambda name: os.path.join(work, name)

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", path("ca.key"), "-out", path("ca.pem"),
            "-days", "2", "-subj", "/CN=Herald test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", path("server.key"), "-out", path("server.csr"),
            "-subj", "/CN=localhost")
    with open(path("server.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                "basicConstraints=critical,CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", path("server.csr"), "-CA", path("ca.pem"),
            "-CAkey", path("ca.key"), "-CAcreateserial", "-out", path("server.pem"),
            "-days", "2", "-extfile", path("server.ext"))
    with open(path("ca.pem"), "rb") as src, open(ca_out, "wb") as dst:
        dst.write(src.read())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(path("server.pem"), path("server.key"))
    return context


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--refuse-auth", action="store_true")
    parser.add_argument("--tls", choices=["none", "starttls", "implicit"], default="none")
    args = parser.parse_args()

    handler = Handler(args.out)
    loop = asyncio.get_running_loop()
    options = {"hostname": "sink.herald.test"}
    if args.refuse_auth:
        options["authenticator"] = lambda *_: AuthResult(success=False, handled=False)
        options["auth_require_tls"] = False
    wrap = None
    if args.tls != "none":
        context = make_certificates(args.out + ".ca.pem")
        if args.tls == "starttls":
            options["tls_context"] = context
            options["require_starttls"] = True
        else:
            wrap = context
    server = await loop.create_server(
        lambda: SMTP(handler, **options), args.host, args.port, ssl=wrap
    )
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)

    # Ends when the parent closes our stdin (or dies).
    stdin_closed = loop.create_future()

    def watch_stdin():
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set_result, None)

    threading.Thread(target=watch_stdin, daemon=True).start()
    await stdin_closed
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
