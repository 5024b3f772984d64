"""A real SMTP server for Herald's e-mail tests (aiosmtpd), with scripted refusals.

    python3 tests/smtp/sink.py --out /tmp/mail.jsonl [--port 0] [--host 127.0.0.1] [--refuse-auth]

Listens on the port (0: a free one), then prints `READY <port>` on stdout. Every RCPT and
every message received is appended to --out as one JSON line:

    {"event": "rcpt", "address": "...", "answer": "250 OK"}
    {"event": "message", "mail_from": "...", "rcpt_tos": [...], "raw": "...",
     "headers": {"Message-ID": "...", ...}, "parts": [{"content_type": "text/plain", "body": "..."}]}

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
import sys
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


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--refuse-auth", action="store_true")
    args = parser.parse_args()

    handler = Handler(args.out)
    loop = asyncio.get_running_loop()
    options = {"hostname": "sink.herald.test"}
    if args.refuse_auth:
        options["authenticator"] = lambda *_: AuthResult(success=False, handled=False)
        options["auth_require_tls"] = False
    server = await loop.create_server(lambda: SMTP(handler, **options), args.host, args.port)
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
