"""Cursor tokens: the opaque `X-Export-Cursor` an export hands out and `since=` takes back.

A token stands for the snapshot an export read (PostgreSQL's pg_current_snapshot()), for one
table of one PostgreSQL cluster and one set of filters. It is self-contained, so a pull that
failed is retried with the same token and nothing is stored per job. It is encrypted and
authenticated (AES-256-GCM, with a key derived from a secret of the service's schema, which
every process and replica shares and which outlives restarts): a token can neither be read
(it holds the cluster's system identifier and the table's oid) nor edited into a snapshot
that would skip rows.

Layout, version 2 (then base64url without padding):
    version 1 byte | nonce 12 | AES-256-GCM of the body, its tag 16 (the version byte as
    associated data)
The body:
    flags 1 byte | system identifier 8 | timeline 4 | table oid 4 |
    name digest 8 | filter digest 8 | shape digest 8 | snapshot xmin 8 |
    varint xmax - xmin | varint count | count varints: each running xid minus the previous one
    (the first minus xmin) | varint oldest writer - xmin
Flags: 1 = the running transactions are unknown (a snapshot taken on a standby, where
pg_current_snapshot() lists none): every id from xmin to xmax may have been running.

Version 1, which the service issued before, is still taken back: the version byte, the body
in the clear, then HMAC-SHA256 of both with the secret itself, its first 16 bytes.
"""

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from exporter.errors import Gone

VERSION = 2
_SIGNED_VERSION = 1
# As every query parameter (query.MAX_VALUE_LENGTH): room for some 2,500 running transactions.
MAX_TOKEN_LENGTH = 10_000
_HEAD = struct.Struct(">BQII8s8s8sQ")
_RUNNING_UNKNOWN = 1
_MAC_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
# What the encryption key is derived from the secret for: the secret itself signs version 1.
_KEY_PURPOSE = b"exporter cursor token encryption, version 2"


class CursorInvalid(ValueError):
    """Malformed, tampered with, or made for another dataset or other filters: a 400."""


class CursorExpired(Gone):
    """A genuine cursor that can no longer be honoured: a 410, and a full export."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            detail=f"{message}; run a full export (without since=) and pull from its cursor",
        )


@dataclass(frozen=True)
class Snapshot:
    """A PostgreSQL snapshot with 64-bit transaction ids: every id below xmin had ended, none
    from xmax on had started, and those in `running` were in progress."""

    xmin: int
    xmax: int
    running: tuple[int, ...]
    # False for a standby's snapshot: PostgreSQL lists no running transactions there, though
    # some were (xmin, the oldest, certainly was).
    complete: bool = True

    @classmethod
    def parse(cls, text: str) -> "Snapshot":
        """From pg_snapshot's text form, `xmin:xmax:xip,xip`."""
        xmin, xmax, running = text.split(":")
        return cls(int(xmin), int(xmax), tuple(int(x) for x in running.split(",") if x))

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, self.running))}"

    @property
    def oldest_running(self) -> int:
        """Every transaction below this id had ended when the snapshot was taken: a row
        version whose xmin is below it (a subtransaction's id included, since a
        subtransaction's id is above its parent's) was visible in the snapshot if it is
        committed now."""
        if not self.complete:
            return self.xmin
        return min(self.running, default=self.xmax)

    def saw_committed(self, xid: int) -> bool:
        """Whether the top-level transaction `xid`, committed by now, was certainly visible in
        the snapshot (PostgreSQL's pg_visible_in_snapshot; exact for top-level ids only, and
        only where the running transactions are known)."""
        if not self.complete:
            return xid < self.xmin
        return xid < self.xmin or (xid < self.xmax and xid not in self.running)


@dataclass(frozen=True)
class Cursor:
    system_identifier: int
    # PostgreSQL's timeline (as of its latest checkpoint): a failover or a point-in-time
    # recovery starts a new one, and may reuse transaction ids the cursor counts as seen.
    timeline: int
    relid: int
    name_digest: bytes
    # The filters and the key's role: rows another role could not see never come later.
    filter_digest: bytes
    # The database, the columns as the key sees them, and the table's partitions or children:
    # a column added with a default, or a partition attached, changes rows without new
    # versions.
    shape_digest: bytes
    snapshot: Snapshot
    # The oldest transaction running at the snapshot that could have written the table: the
    # snapshot's oldest running one, unless that ran in another database (which no
    # subtransaction of it could write here).
    oldest_writer: int


def digest(*parts: str) -> bytes:
    """Eight bytes standing for a dataset's name or a request's filters."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.digest()[:8]


def encode(cursor: Cursor, secret: bytes) -> str:
    snapshot = cursor.snapshot
    body = bytearray(
        _HEAD.pack(
            0 if snapshot.complete else _RUNNING_UNKNOWN,
            cursor.system_identifier,
            cursor.timeline,
            cursor.relid,
            cursor.name_digest,
            cursor.filter_digest,
            cursor.shape_digest,
            snapshot.xmin,
        )
    )
    _put_varint(body, snapshot.xmax - snapshot.xmin)
    running = sorted(snapshot.running)
    _put_varint(body, len(running))
    previous = snapshot.xmin
    for xid in running:
        _put_varint(body, xid - previous)
        previous = xid
    _put_varint(body, cursor.oldest_writer - snapshot.xmin)
    version = bytes([VERSION])
    # A random nonce: 2^-32 odds of a repeat only after 2^32 tokens under one secret.
    nonce = secrets.token_bytes(_NONCE_BYTES)
    sealed = _cipher(secret).encrypt(nonce, bytes(body), version)
    return base64.urlsafe_b64encode(version + nonce + sealed).rstrip(b"=").decode("ascii")


def decode(token: str, secret: bytes) -> Cursor:
    """The cursor a token stands for; CursorInvalid unless this service made it, unchanged."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise CursorInvalid(f"a cursor is at most {MAX_TOKEN_LENGTH} characters")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise CursorInvalid("not a cursor this service issued (not base64url)") from None
    if raw[:1] == bytes([VERSION]) and len(raw) >= 1 + _NONCE_BYTES + _TAG_BYTES:
        nonce, sealed = raw[1 : 1 + _NONCE_BYTES], raw[1 + _NONCE_BYTES :]
        try:
            body = _cipher(secret).decrypt(nonce, sealed, raw[:1])
        except InvalidTag:
            raise CursorInvalid("not a cursor this service issued, or altered") from None
    elif raw[:1] == bytes([_SIGNED_VERSION]) and len(raw) >= 1 + _MAC_BYTES:
        signed, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, _mac(secret, signed)):
            raise CursorInvalid("not a cursor this service issued, or altered")
        body = signed[1:]
    else:
        raise CursorInvalid("not a cursor this service issued (unknown format)")
    return _parsed(body)


def _parsed(body: bytes) -> Cursor:
    """A genuine token's body (made by this service: its structure is checked all the same)."""
    if len(body) < _HEAD.size:
        raise CursorInvalid("not a cursor this service issued (unknown format)")
    (
        flags,
        system_identifier,
        timeline,
        relid,
        name_digest,
        filter_digest,
        shape_digest,
        xmin,
    ) = _HEAD.unpack_from(body)
    values = _varints(body[_HEAD.size :])
    try:
        span, count = next(values), next(values)
        running = []
        previous = xmin
        for _ in range(count):
            previous += next(values)
            running.append(previous)
        oldest_writer = xmin + next(values)
    except StopIteration:
        raise CursorInvalid("not a cursor this service issued (truncated)") from None
    if next(values, None) is not None:
        raise CursorInvalid("not a cursor this service issued (trailing data)")
    snapshot = Snapshot(xmin, xmin + span, tuple(running), not flags & _RUNNING_UNKNOWN)
    if not snapshot.oldest_running <= oldest_writer <= snapshot.xmax or flags & ~_RUNNING_UNKNOWN:
        raise CursorInvalid("not a cursor this service issued (inconsistent)")
    return Cursor(
        system_identifier,
        timeline,
        relid,
        name_digest,
        filter_digest,
        shape_digest,
        snapshot,
        oldest_writer,
    )


def _cipher(secret: bytes) -> AESGCM:
    return AESGCM(hmac.new(secret, _KEY_PURPOSE, hashlib.sha256).digest())


def _mac(secret: bytes, body: bytes | bytearray) -> bytes:
    return hmac.new(secret, bytes(body), hashlib.sha256).digest()[:_MAC_BYTES]


def _put_varint(out: bytearray, value: int) -> None:
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return


def _varints(data: Iterable[int]) -> Iterator[int]:
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            yield value
            value = shift = 0
        elif shift > 63:
            raise CursorInvalid("not a cursor this service issued (bad number)")
    if shift:
        raise CursorInvalid("not a cursor this service issued (truncated)")
