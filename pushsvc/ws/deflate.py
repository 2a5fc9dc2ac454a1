"""Shared compressed frames: WebSocket permessage-deflate, compressed once per batch.

RFC 7692 lets the server impose ``server_no_context_takeover`` (7.1.1.1) and
``client_no_context_takeover`` (7.1.1.2, which a server may add to an offer):
every compressed message then starts from an empty LZ77 window, so the
compressed bytes of a message are a pure function of its text. The fan-out
(:func:`pushsvc.core.outbox.fan_out`) therefore compresses a batch once and
writes the same RSV1 frame to every connection that negotiated the extension
(the idea of gorilla/websocket's ``PreparedMessage``), and no connection holds a
compressor or a long-lived inflater:

- negotiation is the ``websockets`` library's
  (:class:`~websockets.extensions.permessage_deflate.ServerPerMessageDeflateFactory`,
  :data:`SERVER_FACTORY`): it answers a client's offer with both
  ``no_context_takeover`` parameters, and its ``PerMessageDeflate`` then makes a
  zlib inflater only while a compressed client message is decoded (deleted at the
  message's last frame) and never a compressor of its own for our direct writes;
- :class:`DeflateFraming` is the fan-out's framing for those connections: a
  batch of at least ``min_bytes`` UTF-8 bytes is raw-deflated
  (``zlib.compressobj(level, DEFLATED, -window_bits)``), flushed with
  ``Z_SYNC_FLUSH`` and stripped of the trailing ``00 00 ff ff`` (RFC 7692
  7.2.1), and framed as one final text frame with RSV1 set (7.2.3.1); a smaller
  batch, or one that would not shrink, goes out as a plain text frame, which
  the extension allows per message (RFC 7692 6).

Client messages may arrive compressed; ``websockets`` decodes them, bounded by
``ws_max_size`` (``PUSHSVC_MAX_FRAME_BYTES``) *after* inflation, so a small
compressed frame cannot inflate past the limit (1009).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)

LEVEL = 6  # zlib level of the shared compressor (one compression per batch, not per socket)
SERVER_WINDOW_BITS = 15  # LZ77 window of our frames, 2**15 bytes, unless the client asks less
#: the window clients may use towards the server (2**12 = 4 KiB): bounds the inflater
#: ``websockets`` makes for one compressed client message (freed after it)
CLIENT_WINDOW_BITS = 12
#: characters of recent batch texts whose frames a :class:`DeflateFraming` keeps
RECENT_CHARS = 2 * 1024 * 1024
_TAIL = b"\x00\x00\xff\xff"  # the empty stored block a sync flush ends with (RFC 7692 7.2.1)
_FIN_TEXT = 0x81  # FIN + opcode 1 (RFC 6455 5.2)
_FIN_RSV1_TEXT = 0xC1  # FIN + RSV1 ("per-message compressed", RFC 7692 6) + opcode 1

#: the ``websockets`` negotiation pushsvc's WebSocket protocol offers when
#: uvicorn's ``ws_per_message_deflate`` is on (``PUSHSVC_COMPRESSION=deflate``)
SERVER_FACTORY = ServerPerMessageDeflateFactory(
    server_no_context_takeover=True,
    client_no_context_takeover=True,
    client_max_window_bits=CLIENT_WINDOW_BITS,
    compress_settings={"level": LEVEL, "memLevel": 8},
)


def frame_header(first: int, length: int) -> bytes:
    """The header of an unmasked server frame (RFC 6455 5.2).

    Args:
        first: the first byte (FIN, RSV1-3, opcode).
        length: payload length in bytes (7-bit, 16-bit or 64-bit length field).
    """
    if length < 126:
        return struct.pack("!BB", first, length)
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def compress(data: bytes, window_bits: int = SERVER_WINDOW_BITS, level: int = LEVEL) -> bytes:
    """The permessage-deflate payload of one message (RFC 7692 7.2.1), no context kept.

    Args:
        data: the message's bytes.
        window_bits: LZ77 window, 9..15 (``server_max_window_bits``, RFC 7692 7.1.2.1).
        level: zlib level, 0..9.

    Returns:
        Raw deflate blocks, sync-flushed, without the trailing ``00 00 ff ff``.
    """
    encoder = zlib.compressobj(level, zlib.DEFLATED, -window_bits)
    out = encoder.compress(data) + encoder.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(_TAIL) else out


class DeflateFraming:
    """Batch text -> wire bytes for connections that negotiated shared permessage-deflate.

    Callable like :func:`pushsvc.ws.transport.text_frame` (the core's ``framing``):
    one object per window size and threshold (:func:`deflate_framing`), shared by
    every such connection of the process. It keeps its last result keyed by the
    text's identity, so a fan-out compresses a batch once for all of them, and
    the frames of recent batches (up to :data:`RECENT_CHARS` characters of text)
    keyed by the text's content: connections that fell behind together flush the
    same pending frames joined into equal texts (distinct objects), which are
    then compressed once too, not once per connection (a 64 KiB batch of distinct
    order books costs ~2 ms to compress at level 6).

    Args:
        window_bits: LZ77 window of the compressor, 9..15 (the negotiated
            ``server_max_window_bits``; 15 when the client set none).
        min_bytes: ``PUSHSVC_COMPRESSION_MIN_BYTES``: batches of fewer UTF-8 bytes
            go out uncompressed.
        level: zlib level, 0..9.
    """

    __slots__ = (
        "_last_frame",
        "_last_text",
        "_recent",
        "_recent_chars",
        "level",
        "min_bytes",
        "window_bits",
    )

    def __init__(self, window_bits: int, min_bytes: int, level: int = LEVEL) -> None:
        self.window_bits = window_bits
        self.min_bytes = min_bytes
        self.level = level
        self._last_text: str | None = None
        self._last_frame = b""
        self._recent: dict[str, bytes] = {}  # text -> frame, oldest first
        self._recent_chars = 0

    def __call__(self, text: str) -> bytes:
        """The frame of ``text``: RSV1 + compressed payload, or a plain text frame when
        ``text`` is under ``min_bytes`` or would not shrink."""
        if text is self._last_text:
            return self._last_frame
        recent = self._recent
        frame = recent.get(text)
        if frame is None:
            frame = recent[text] = self._frame(text)
            self._recent_chars += len(text)
            while self._recent_chars > RECENT_CHARS and len(recent) > 1:
                oldest = next(iter(recent))
                del recent[oldest]
                self._recent_chars -= len(oldest)
        self._last_text = text
        self._last_frame = frame
        return frame

    def _frame(self, text: str) -> bytes:
        data = text.encode()
        frame = b""
        if len(data) >= self.min_bytes:
            payload = compress(data, self.window_bits, self.level)
            if len(payload) < len(data):
                frame = frame_header(_FIN_RSV1_TEXT, len(payload)) + payload
        if not frame:
            frame = frame_header(_FIN_TEXT, len(data)) + data
        return frame


_framings: dict[tuple[int, int], DeflateFraming] = {}


def deflate_framing(window_bits: int, min_bytes: int) -> DeflateFraming:
    """The process's shared :class:`DeflateFraming` for this window and threshold."""
    key = (window_bits, min_bytes)
    framing = _framings.get(key)
    if framing is None:
        framing = _framings[key] = DeflateFraming(window_bits, min_bytes)
    return framing


def shared_deflate(extensions: Sequence[Any]) -> PerMessageDeflate | None:
    """The negotiated permessage-deflate if shared frames may be written to its connection.

    That is: it is the only extension and the server keeps no context
    (``server_no_context_takeover``, RFC 7692 7.1.1.1), as :data:`SERVER_FACTORY`
    negotiates. None otherwise (no extension, another one, or a deflate
    negotiated with context takeover by another factory).
    """
    if len(extensions) != 1:
        return None
    ext = extensions[0]
    if isinstance(ext, PerMessageDeflate) and ext.local_no_context_takeover:
        return ext
    return None
