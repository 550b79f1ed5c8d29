"""Is the Kafka broker serving? One real Metadata request, standard library only.

stack.sh runs this before any virtualenv exists (so no confluent-kafka), and a JVM-based
CLI would add seconds to every health poll. A broker only opens its client listener once
it has joined the KRaft quorum and been unfenced, and only unfenced brokers are listed in
a Metadata response, so "the response lists our node and a controller" means ready.

For the secured broker the same request goes over TLS (verified against the stack's CA)
after a SASL/SCRAM-SHA-512 login (RFC 5802, as Kafka speaks it: SaslHandshake v1, then
SaslAuthenticate v0), so "ready" also means the listener, its certificate and the user work.

Usage: python3 kafka_probe.py HOST PORT [NODE_ID] [--sasl-ssl CA_FILE USER PASSWORD_FILE];
exit 0 when ready, 1 otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import ssl
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


CLIENT_ID = b"stack.sh-probe"
API_SASL_HANDSHAKE = 17
API_SASL_AUTHENTICATE = 36
SCRAM = "SCRAM-SHA-512"


def _call(sock: socket.socket, api: int, version: int, body: bytes) -> _Reader:
    """One request (header v1) and its response, positioned after the correlation id."""
    request = struct.pack(">hhih", api, version, CORRELATION_ID, len(CLIENT_ID)) + CLIENT_ID + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = _Reader(_recv_exact(sock, size))
    if reader.take(">i") != CORRELATION_ID:
        raise ConnectionError("response does not match the request")
    return reader


def _authenticate(sock: socket.socket, message: bytes) -> bytes:
    reader = _call(sock, API_SASL_AUTHENTICATE, 0, struct.pack(">i", len(message)) + message)
    error = reader.take(">h")
    text = reader.string()
    if error:
        raise ConnectionError(f"SASL authentication failed (error {error}: {text})")
    length = reader.take(">i")
    return reader.data[reader.pos : reader.pos + length]


def _scram_login(sock: socket.socket, user: str, password: str) -> None:
    """SASL/SCRAM-SHA-512 as Kafka speaks it: the mechanism, then the SCRAM messages."""
    mechanism = SCRAM.encode()
    reader = _call(sock, API_SASL_HANDSHAKE, 1, struct.pack(">h", len(mechanism)) + mechanism)
    if reader.take(">h"):
        raise ConnectionError(f"the broker does not offer {SCRAM}")
    name = user.replace("=", "=3D").replace(",", "=2C")
    nonce = secrets.token_urlsafe(18)
    first_bare = f"n={name},r={nonce}"
    server_first = _authenticate(sock, f"n,,{first_bare}".encode()).decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    if not fields["r"].startswith(nonce):
        raise ConnectionError("the server's SCRAM nonce does not extend ours")
    salted = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.digest(salted, b"Client Key", "sha512")
    final_bare = f"c=biws,r={fields['r']}"
    auth = f"{first_bare},{server_first},{final_bare}".encode()
    signature = hmac.digest(hashlib.sha512(client_key).digest(), auth, "sha512")
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    server_final = _authenticate(sock, f"{final_bare},p={proof.decode()}".encode()).decode()
    server_key = hmac.digest(salted, b"Server Key", "sha512")
    expected = base64.b64encode(hmac.digest(server_key, auth, "sha512")).decode()
    if server_final != f"v={expected}":
        raise ConnectionError("the server's SCRAM signature does not verify")


def probe(
    host: str, port: int, node_id: int, sasl_ssl: tuple[str, str, str] | None = None
) -> str | None:
    """Return None when ready, else a reason. `sasl_ssl`: (CA file, user, password file)."""
    # topics = [] (no topic metadata wanted), allow_auto_topic_creation = false
    body = struct.pack(">i?", 0, False)
    with socket.create_connection((host, port), timeout=3) as raw:
        raw.settimeout(3)
        sock = raw
        if sasl_ssl is not None:
            ca_file, user, password_file = sasl_ssl
            with open(password_file, encoding="utf-8") as handle:
                password = handle.read().strip()
            context = ssl.create_default_context(cafile=ca_file)
            sock = context.wrap_socket(raw, server_hostname=host)
            _scram_login(sock, user, password)
        reader = _call(sock, API_METADATA, METADATA_VERSION, body)
        if sock is not raw:
            sock.close()
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
    args = sys.argv[1:]
    sasl_ssl = None
    if "--sasl-ssl" in args:
        at = args.index("--sasl-ssl")
        ca_file, user, password_file = args[at + 1 : at + 4]
        sasl_ssl = (ca_file, user, password_file)
        del args[at : at + 4]
    host, port = args[0], int(args[1])
    node_id = int(args[2]) if len(args) > 2 else 1
    try:
        reason = probe(host, port, node_id, sasl_ssl)
    except (OSError, struct.error, UnicodeDecodeError, KeyError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if reason is not None:
        print(f"kafka not ready at {host}:{port}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
