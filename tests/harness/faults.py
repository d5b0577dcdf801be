"""Fault injection for the reliability tests: a TCP proxy the test can cut or freeze, and a Redis of its own."""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.helpers import stop_process_group

LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll `predicate()` (sleeping between tries) until it is true; AssertionError naming `what` if not."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class FaultProxy:
    """A TCP proxy from 127.0.0.1:port to a target, in threads of the test process.

    - up: bytes flow both ways.
    - frozen: connections are accepted and kept open, but no byte is forwarded (a hung server).
    - down: the port refuses connections and every open connection is cut (an unreachable server).
    The port stays the same across down/up, so clients configured with it reconnect by themselves.
    """

    def __init__(self, target_port: int, target_host: str = LOCALHOST, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted so far: proves traffic went through the proxy

    @property
    def url_host(self) -> str:
        """host:port of the proxy."""
        return f"{LOCALHOST}:{self.port}"

    def up(self) -> FaultProxy:
        """Listen (again) and let bytes flow."""
        self._flowing.set()
        if self._listener is None:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((LOCALHOST, self.port))
            listener.listen(128)
            self._listener = listener
            self._stopped.clear()
            self._accept_thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
            self._accept_thread.start()
        return self

    def freeze(self) -> None:
        """Keep accepting connections but forward nothing until thaw() (or up())."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Let the frozen bytes flow again."""
        self._flowing.set()

    def down(self) -> None:
        """Refuse new connections and cut the open ones."""
        self._stopped.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        # Pumps blocked on a frozen proxy wake up and see their sockets gone.
        self._flowing.set()

    close = down

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], 0.2)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._stopped.is_set():
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([src], [], [], 0.5)
                if self._stopped.is_set() and src not in self._conns:
                    return
                if not ready:
                    continue
                # A frozen proxy holds the bytes it has not read yet: the peer sees a hung server.
                while not self._flowing.wait(0.5):
                    if src not in self._conns:
                        return
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class RedisServer:
    """A redis-server of the test's own on its own port, with append-only persistence (as in compose)."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not on PATH; install Redis to run the reliability tests")
        self.exe = exe
        self.folder = folder
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The broker URL of this server."""
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start redis-server on the port and folder (reloading its append-only file) and wait for PING."""
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "redis.log").open("ab")
        cmd = [
            self.exe,
            "--port",
            str(self.port),
            "--bind",
            LOCALHOST,
            "--appendonly",
            "yes",
            "--dir",
            str(self.folder),
            "--save",
            "",
        ]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.starts += 1
        client = redis.Redis(host=LOCALHOST, port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.folder}/redis.log")
            try:
                # LOADING is answered while the append-only file is replayed: wait until it is done.
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (redis flushes the append-only file and exits), SIGKILL if it hangs."""
        stop_process_group(self.proc, timeout, kill_wait=5)

    def restart(self) -> None:
        """Stop and start again on the same port and folder."""
        self.stop()
        self.start()
