"""A real gRPC ProfilesService for tests, and decoding with the real ``protoc``.

No OTLP collector binary can be installed here, so tests run this server (grpcio, the
generated servicer from opentelemetry-proto) and check what it received.
"""

from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2, profiles_service_pb2_grpc

from stackfleet.nats_server import free_port

REQUEST_TYPE = "opentelemetry.proto.collector.profiles.v1development.ExportProfilesServiceRequest"


class _Servicer(profiles_service_pb2_grpc.ProfilesServiceServicer):
    def __init__(self, owner: OtlpTestServer) -> None:
        self.owner = owner

    def Export(self, request: Any, context: Any) -> Any:
        with self.owner.lock:
            self.owner.requests.append(request)
        return profiles_service_pb2.ExportProfilesServiceResponse()


class OtlpTestServer:
    """Listens on 127.0.0.1:<free port>; ``requests`` holds every ExportProfilesServiceRequest."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Any] = []
        self.lock = threading.Lock()
        self.server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpTestServer:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        profiles_service_pb2_grpc.add_ProfilesServiceServicer_to_server(_Servicer(self), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.stop(grace=1).wait()

    def wait_for_requests(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= n, f"received {len(self.requests)} export(s), wanted {n}"

    def __enter__(self) -> OtlpTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def descriptor_set() -> bytes:
    """A FileDescriptorSet of the profiles service proto and its dependencies.

    opentelemetry-proto ships generated modules, not .proto files; their embedded file
    descriptors are exactly what ``protoc --descriptor_set_in`` needs.
    """
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(fd: Any) -> None:
        if fd.name in files:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        files[fd.name] = proto

    add(profiles_service_pb2.DESCRIPTOR)
    return descriptor_pb2.FileDescriptorSet(file=list(files.values())).SerializeToString()


def protoc_decode(path: Path, message: str = REQUEST_TYPE) -> str:
    """Decode a binary protobuf file with the real protoc; raises if protoc cannot parse it."""
    with tempfile.NamedTemporaryFile(suffix=".pb") as desc:
        desc.write(descriptor_set())
        desc.flush()
        with open(path, "rb") as data:
            result = subprocess.run(["protoc", f"--descriptor_set_in={desc.name}", f"--decode={message}"],
                                    stdin=data, capture_output=True, check=False)
    if result.returncode != 0:
        raise AssertionError(f"protoc could not decode {path}: {result.stderr.decode()[-500:]}")
    return result.stdout.decode()
