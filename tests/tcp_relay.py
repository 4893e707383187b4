"""A TCP relay on 127.0.0.1 that a test can cut and restore (a database outage, as clients see it), or
black-hole (packets dropped and no connection closed: a database gone silent). Also used by
bench/blackhole.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

NFT = shutil.which("nft") or "/usr/sbin/nft"


def black_hole_unavailable() -> str | None:
    """Why `TcpRelay.black_hole` cannot work here (it needs root and nftables), or None."""
    if os.geteuid() != 0:
        return "dropping packets needs root"
    if not os.path.exists(NFT):
        return "nft is not installed (apt-get install nftables, or `bash .ci/run`)"
    probe = subprocess.run([NFT, "list", "tables"], check=False, capture_output=True, text=True)
    return None if probe.returncode == 0 else f"nftables does not work here: {probe.stderr.strip()}"


_TABLE_PREFIX = "taskproxy_relay_"


def _remove_stale_black_holes() -> None:
    """Delete the tables left by a black hole whose process was killed inside it (named by its pid):
    they would go on dropping packets for a port the kernel may give someone else."""
    listed = subprocess.run([NFT, "list", "tables"], check=False, capture_output=True, text=True).stdout.split()
    for name in listed:
        if name.startswith(_TABLE_PREFIX) and (pid := name[len(_TABLE_PREFIX) :].split("_")[0]).isdigit():
            if not os.path.exists(f"/proc/{pid}"):
                subprocess.run([NFT, "delete", "table", "inet", name], check=False, capture_output=True)


class TcpRelay:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        probe = socket.socket()
        probe.bind((host, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.target[0], self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        if listener is not None:
            listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @contextmanager
    def black_hole(self) -> Iterator[None]:
        """Drop every packet to and from the relay's port (nftables, on loopback) while inside: its
        connections stay open to nothing. Only this relay's traffic is touched."""
        _remove_stale_black_holes()
        table = f"{_TABLE_PREFIX}{os.getpid()}_{self.port}"
        commands = [
            ["add", "table", "inet", table],
            ["add", "chain", "inet", table, "input", "{ type filter hook input priority 0 ; }"],
            ["add", "rule", "inet", table, "input", "tcp", "dport", str(self.port), "drop"],
            ["add", "rule", "inet", table, "input", "tcp", "sport", str(self.port), "drop"],
        ]
        try:
            for command in commands:
                subprocess.run([NFT, *command], check=True, capture_output=True)
            yield
        finally:
            subprocess.run([NFT, "delete", "table", "inet", table], check=False, capture_output=True)
