"""Is the Kafka broker serving? One real Metadata request, standard library only.

stack.sh runs this before any virtualenv exists (so no confluent-kafka), and a JVM-based
CLI would add seconds to every health poll. A broker only opens its client listener once
it has joined the KRaft quorum and been unfenced, and only unfenced brokers are listed in
a Metadata response, so "the response lists our node and a controller" means ready.

Usage: python3 kafka_probe.py HOST PORT [NODE_ID]; exit 0 when ready, 1 otherwise.
"""

from __future__ import annotations

import socket
import struct
import sys

API_METADATA = 3
# v4 is plain (non-flexible) encoding and is accepted by Kafka 1.0 through 4.x.
METADATA_VERSION = 4
CORRELATION_ID = 0x5717


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        text = self.data[self.pos : self.pos + length].decode("utf-8")
        self.pos += length
        return text


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


def probe(host: str, port: int, node_id: int) -> str | None:
    """Return None when ready, else a reason."""
    client_id = b"stack.sh-probe"
    request = struct.pack(">hhih", API_METADATA, METADATA_VERSION, CORRELATION_ID, len(client_id))
    # topics = [] (no topic metadata wanted), allow_auto_topic_creation = false
    request += client_id + struct.pack(">i?", 0, False)
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.settimeout(3)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        reader = _Reader(_recv_exact(sock, size))
    if reader.take(">i") != CORRELATION_ID:
        return "response does not match the request"
    reader.take(">i")  # throttle_time_ms
    nodes = []
    for _ in range(reader.take(">i")):
        nodes.append(reader.take(">i"))
        reader.string()  # host
        reader.take(">i")  # port
        reader.string()  # rack
    reader.string()  # cluster_id
    controller = reader.take(">i")
    if node_id not in nodes:
        return f"node {node_id} is not among the live brokers {nodes}"
    if controller < 0:
        return "no active controller yet"
    return None


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    node_id = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    try:
        reason = probe(host, port, node_id)
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if reason is not None:
        print(f"kafka not ready at {host}:{port}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
