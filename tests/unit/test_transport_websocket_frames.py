"""WebSocketConnection: client frames are masked per RFC 6455, and a frame the kernel takes only in
part is finished by later calls with the same bytes (paho 2.2 dropped the packet instead)."""

from __future__ import annotations

import socket

import pytest

from edgefl.transport._paho import WebSocketConnection


def decode_frame(frame: bytes) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of one complete client frame."""
    opcode, second = frame[0] & 0x0F, frame[1]
    assert frame[0] & 0x80  # FIN
    assert second & 0x80  # masked
    length, pos = second & 0x7F, 2
    if length == 126:
        length, pos = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, pos = int.from_bytes(frame[2:10], "big"), 10
    key, body = frame[pos : pos + 4], frame[pos + 4 :]
    assert len(body) == length
    return opcode, bytes(b ^ key[i % 4] for i, b in enumerate(body))


def connection(sock: socket.socket) -> WebSocketConnection:
    ws = WebSocketConnection.__new__(WebSocketConnection)  # past the HTTP upgrade
    ws._socket = sock
    ws._sendbuffer = bytearray()
    ws._requested_size = 0
    return ws


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70001])
def test_frames_are_masked_binary_frames_of_the_payload(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    ws = connection(socket.socket())

    frame = ws._create_frame(WebSocketConnection.OPCODE_BINARY, bytearray(payload))

    assert decode_frame(bytes(frame)) == (WebSocketConnection.OPCODE_BINARY, payload)


def test_a_partly_sent_frame_is_finished_by_the_retries_with_the_same_bytes() -> None:
    payload = bytes(i % 253 for i in range(1_000_000))
    left, right = socket.socketpair()
    with left, right:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        left.setblocking(False)
        ws = connection(left)
        received = bytearray()
        partial_sends = 0
        while True:  # what paho does: re-queue on BlockingIOError, call again with the same data
            try:
                written = ws.send(payload)
                break
            except BlockingIOError:
                partial_sends += 1
                received += right.recv(1 << 20)
        right.setblocking(False)
        while True:
            try:
                chunk = right.recv(1 << 20)
            except BlockingIOError:
                break
            received += chunk

    assert written == len(payload)
    assert partial_sends > 0
    assert decode_frame(bytes(received)) == (WebSocketConnection.OPCODE_BINARY, payload)
