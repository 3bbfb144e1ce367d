"""Protobuf messages over a pipe: a 4-byte little-endian length, then the message (forkserver <-> ksleepd)."""
from __future__ import annotations

import asyncio
import os
import struct

_HEADER = struct.Struct("<I")
MAX_MESSAGE = 1 << 20


def encode(message) -> bytes:
    data = message.SerializeToString()
    return _HEADER.pack(len(data)) + data


def read_blocking(fd: int, message_type):
    """The next message from `fd`, or None at end of file."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes exceeds {MAX_MESSAGE}")
    body = _read_exact(fd, size) if size else b""
    if body is None:
        raise EOFError("pipe closed in the middle of a message")
    return message_type.FromString(body)


def _read_exact(fd: int, size: int) -> bytes | None:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            if remaining == size:
                return None
            raise EOFError("pipe closed in the middle of a message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


async def read_async(reader: asyncio.StreamReader, message_type):
    """The next message from an asyncio stream, or None at end of file."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_MESSAGE:
            raise ValueError(f"message of {size} bytes exceeds {MAX_MESSAGE}")
        return message_type.FromString(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None
