"""A real S3-protocol server for tests: moto's standalone server as its own process on loopback.

``MotoServer`` starts ``moto_server`` on a free port and makes a bucket; ``env()`` gives the AWS
variables a service process needs to reach it. ``TcpGate`` is a loopback TCP relay in front of it
that a fault test can close (the store is down: connections refused) and open again, without the
server losing what it stores.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import httpx

from tests.servers import Process, child_env, free_port, wait_until

BUCKET = "fastcache-results"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer(Process):
    """``moto_server`` on a free loopback port, with one bucket (``BUCKET``)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        binary = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        super().__init__([binary, "-H", "127.0.0.1", "-p", str(self.port)], "moto", env=child_env())
        wait_until(self._up, 60, lambda: f"moto_server did not start:\n{self.log()}", process=self.proc)
        self.client().create_bucket(Bucket=BUCKET)

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/moto-api/", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=endpoint or self.endpoint)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key in the bucket under ``prefix``."""
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(
            item["Key"]
            for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix)
            for item in page.get("Contents", [])
        )

    def env(self, endpoint: str | None = None, **extra: str) -> dict[str, str]:
        """The environment of a service process that stores results here (through ``endpoint`` if given)."""
        return child_env(AWS_ENDPOINT_URL=endpoint or self.endpoint, **CREDENTIALS, **extra)


@contextlib.contextmanager
def aws_environment(endpoint: str):
    """The AWS variables set in this process (for a store opened in-process), restored afterwards."""
    saved = {name: os.environ.get(name) for name in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class TcpGate:
    """A loopback TCP relay to ``target_port``: ``close()`` refuses and cuts connections, ``open()`` relays again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """The store is down: new connections are refused, open ones are cut."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
