"""A stand-in IDE for the daemon's tests: a tiny HTTP server with bad habits on demand.

It listens on CONNECT_TOOL_PORT under CONNECT_TOOL_PATH_PREFIX, as the platform
asks of real IDEs, and can crash, never listen, ignore SIGTERM, answer 502
for a while, or leave an orphan behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["serve", "crash", "never-ready"], default="serve")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--bad-gateway-file", default="", help="answer 502 while this file exists")
    p.add_argument("--orphan-file", default="", help="leave an orphan that writes its pid here")
    p.add_argument(
        "--release-file", default="", help="the orphan exits once this file exists (else 0.5 s)"
    )
    p.add_argument(
        "--daemon-file",
        default="",
        help="double-fork a setsid'd server of its own that writes its pid here and never exits",
    )
    p.add_argument("--env-file", default="", help="write the tool variables here")
    p.add_argument("--never-ready-file", default="", help="never listen while this file exists")
    args = p.parse_args()
    if args.never_ready_file and os.path.exists(args.never_ready_file):
        args.mode = "never-ready"

    print(f"fake-ide {args.mode} pid={os.getpid()}", flush=True)
    if args.env_file:
        with open(args.env_file, "w") as f:
            for k in sorted(os.environ):
                if k.endswith(("TOOL_PORT", "TOOL_PATH_PREFIX")) or k.startswith("STUDIO_"):
                    f.write(f"{k}={os.environ[k]}\n")
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
    if args.orphan_file:
        _leave_orphan(args.orphan_file, args.release_file)
    if args.daemon_file:
        _daemonize(args.daemon_file)
    if args.mode == "crash":
        print("fatal: cannot open workspace database", file=sys.stderr, flush=True)
        sys.exit(3)
    if args.mode == "never-ready":
        while True:
            time.sleep(1)

    port = int(os.environ["CONNECT_TOOL_PORT"])
    prefix = "/" + os.environ.get("CONNECT_TOOL_PATH_PREFIX", "/").strip("/")
    gate = args.bad_gateway_file

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if gate and os.path.exists(gate):
                code = 502
            elif self.path.startswith(prefix):
                code = 200
            else:
                code = 404
            body = f"fake ide {code}\n".encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *a: object) -> None:
            print("http " + fmt % a, flush=True)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"listening on {port}{prefix}", flush=True)
    server.serve_forever()


def _leave_orphan(pid_file: str, release_file: str) -> None:
    """Fork a child that forks a grandchild and exits: the grandchild is orphaned."""
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:
            _write_pid(pid_file)
            # outlive the parent, then exit and wait to be reaped
            if release_file:
                end = time.monotonic() + 60
                while not os.path.exists(release_file) and time.monotonic() < end:
                    time.sleep(0.02)
            else:
                time.sleep(0.5)
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)


def _daemonize(pid_file: str) -> None:
    """The classic double fork with setsid: a server outside the IDE's process group."""
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # as daemons do: the IDE's pipes are not its
                os.dup2(null, fd)
            _write_pid(pid_file)
            while True:
                time.sleep(1)
        os._exit(0)
    os.waitpid(child, 0)


def _write_pid(pid_file: str) -> None:
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)


if __name__ == "__main__":
    main()
