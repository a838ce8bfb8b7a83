"""exporter/incremental/tokens.py on its own: cursors round-trip, anything not made by this
service unchanged is CursorInvalid, and what a snapshot says it saw. Pulls through a real server
are tests/test_incremental.py."""

import base64
import hashlib
import hmac
import re
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from exporter.errors import Gone
from exporter.incremental.tokens import (
    MAX_TOKEN_LENGTH,
    Cursor,
    CursorExpired,
    CursorInvalid,
    Snapshot,
    decode,
    digest,
    encode,
)

SECRET = b"k" * 32


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | 0x80 if value else low)
        if not value:
            return bytes(out)


def signed(body: bytes, secret: bytes = SECRET) -> str:
    """A token of `body`, signed as the module's docstring lays it out: what only someone who
    holds the secret could make."""
    mac = hmac.new(secret, body, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()


def head(flags: int = 0, xmin: int = 1_000, version: int = 1) -> bytes:
    return struct.pack(
        ">BBQII8s8s8sQ", version, flags, 7, 1, 42, digest("t"), digest(), digest(), xmin
    )


def test_a_cursor_round_trips_and_any_change_is_refused() -> None:
    secret = b"s" * 32
    snapshot = Snapshot(2**40, 2**40 + 900, (2**40, 2**40 + 7))
    cursor = Cursor(
        2**63 + 5, 3, 2**32 - 1, digest("t"), digest(), digest("shape"), snapshot, 2**40 + 7
    )
    token = encode(cursor, secret)
    assert decode(token, secret) == cursor
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for i in range(len(raw)):
        altered = bytearray(raw)
        altered[i] ^= 1
        text = base64.urlsafe_b64encode(bytes(altered)).rstrip(b"=").decode()
        with pytest.raises(CursorInvalid):
            decode(text, secret)
    with pytest.raises(CursorInvalid):
        decode(token, b"another secret")
    for garbage in ("", "x", "!!!!", token[:-3], token + "AAAA", "A" * 20_000):
        with pytest.raises(CursorInvalid):
            decode(garbage, secret)


def test_snapshot_text_and_what_it_saw() -> None:
    snapshot = Snapshot.parse("100:110:100,104")
    assert str(snapshot) == "100:110:100,104"
    assert snapshot.oldest_running == 100
    assert snapshot.saw_committed(99) and snapshot.saw_committed(103)
    assert not snapshot.saw_committed(104) and not snapshot.saw_committed(110)
    assert Snapshot.parse("7:7:").oldest_running == 7


def test_a_standby_cursor_round_trips_without_its_running_transactions() -> None:
    secret = b"s" * 32
    # On a standby, pg_current_snapshot() lists none of the primary's running transactions.
    snapshot = Snapshot(500, 510, (), complete=False)
    cursor = Cursor(1, 1, 2, digest("t"), digest(), digest(), snapshot, 500)
    decoded = decode(encode(cursor, secret), secret)
    assert decoded == cursor
    assert decoded.snapshot.oldest_running == 500
    # Whether 505 was seen is not known: only what is below xmin certainly was.
    assert decoded.snapshot.saw_committed(499) and not decoded.snapshot.saw_committed(505)


def sealed_body(token: str, secret: bytes = SECRET) -> bytes:
    """A version 2 token's body, opened as the module's docstring lays it out."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert raw[0] == 2
    key = hmac.new(secret, b"exporter cursor token encryption, version 2", hashlib.sha256)
    return AESGCM(key.digest()).decrypt(raw[1:13], raw[13:], raw[:1])


def test_the_layout_in_the_docstring_is_the_layout() -> None:
    # xmax - xmin 10, running 1003 and 1005, oldest writer 1003.
    body = head() + varint(10) + varint(2) + varint(3) + varint(2) + varint(3)
    cursor = Cursor(
        7, 1, 42, digest("t"), digest(), digest(), Snapshot(1_000, 1_010, (1_003, 1_005)), 1_003
    )
    # Version 2 seals the body that follows version 1's version byte.
    assert sealed_body(encode(cursor, SECRET)) == body[1:]
    # A version 1 token, issued before, is still taken back.
    assert decode(signed(body), SECRET) == cursor


def test_a_token_reveals_nothing_of_what_it_stands_for() -> None:
    """Issue 14, defect 9: a token's body was readable, the PostgreSQL cluster's system
    identifier and the table's oid in the clear. Sealed, no byte of either shows, and the
    same cursor makes a different token each time."""
    system_identifier, relid = 7_301_234_567_890_123_456, 424_242
    snapshot = Snapshot(2**40, 2**40 + 9, (2**40,))
    cursor = Cursor(system_identifier, 1, relid, digest("t"), digest(), digest(), snapshot, 2**40)
    tokens = {encode(cursor, SECRET) for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        for revealing in (struct.pack(">Q", system_identifier), struct.pack(">I", relid)):
            assert revealing not in raw
        assert decode(token, SECRET) == cursor


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (head(version=3) + varint(0) * 3, "unknown format"),
        (head()[:-1], "unknown format"),
        (head() + varint(10) + varint(2) + varint(3), "truncated"),
        (head() + varint(10) + varint(0) + varint(0) + varint(0), "trailing data"),
        (head() + varint(10) + bytes([0x80]), "truncated"),
        (head() + bytes([0xFF] * 10) + varint(1), "bad number"),
        # The oldest writer below the oldest running transaction, or past xmax.
        (head() + varint(10) + varint(1) + varint(3) + varint(2), "inconsistent"),
        (head() + varint(10) + varint(0) + varint(11), "inconsistent"),
        # A flag this version does not know.
        (head(flags=2) + varint(10) + varint(0) + varint(10), "inconsistent"),
    ],
)
def test_a_signed_token_that_does_not_make_sense_is_refused(body: bytes, words: str) -> None:
    with pytest.raises(CursorInvalid, match=words):
        decode(signed(body), SECRET)


def test_a_token_is_url_safe_without_padding_and_bounded() -> None:
    many = tuple(range(2**33, 2**33 + 5_000, 2))
    snapshot = Snapshot(2**33, 2**33 + 5_000, many)
    cursor = Cursor(1, 1, 2, digest("t"), digest(), digest(), snapshot, 2**33)
    token = encode(cursor, SECRET)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert len(token) <= MAX_TOKEN_LENGTH
    assert decode(token, SECRET) == cursor
    with pytest.raises(CursorInvalid, match=f"at most {MAX_TOKEN_LENGTH}"):
        decode(token + "A" * MAX_TOKEN_LENGTH, SECRET)


def test_running_transactions_come_back_in_order() -> None:
    snapshot = Snapshot(100, 120, (117, 101, 104))
    cursor = Cursor(1, 1, 2, digest("t"), digest(), digest(), snapshot, 101)
    assert decode(encode(cursor, SECRET), SECRET).snapshot.running == (101, 104, 117)


def test_digests_tell_their_parts_apart() -> None:
    assert len(digest("a")) == 8
    assert digest("ab") != digest("a", "b") != digest("a", "", "b")
    assert digest() != digest("")
    # Lone surrogates (a URL may carry one) are digested, each its own.
    assert digest("\udc80") != digest("\udc81")


def test_a_snapshot_that_saw_everything_below_xmax() -> None:
    snapshot = Snapshot.parse("5:9:")
    assert snapshot.running == () and str(snapshot) == "5:9:"
    assert snapshot.oldest_running == 9
    assert snapshot.saw_committed(8) and not snapshot.saw_committed(9)


def test_an_expired_cursor_is_a_410_that_says_what_to_do() -> None:
    expired = CursorExpired("the cursor is from another PostgreSQL cluster")
    assert isinstance(expired, Gone) and expired.status == 410
    assert str(expired) == "the cursor is from another PostgreSQL cluster"
    assert expired.detail == (
        "the cursor is from another PostgreSQL cluster; run a full export (without since=)"
        " and pull from its cursor"
    )
