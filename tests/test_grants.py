"""Signed call grants and the server-to-boot clock mapping (docs/protocol.md 2, 3.2, 4).

Every clock here is an integer chosen by the test; nothing sleeps.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tabletd.errors import TabletdError
from tabletd.link.grants import (
    ClockMapping,
    GrantBody,
    GrantKeyError,
    GrantRefused,
    GrantVerifier,
    NonceStore,
    NonceStoreError,
    canonical_grant_bytes,
    load_public_key,
    sign_grant,
)
from tabletd.session import Grant

REPO = Path(__file__).resolve().parent.parent
MS = 1_000_000  # ns
S = 1_000 * MS  # ns
MIN_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# ---- the test vectors (also in docs/protocol.md, "Appendix A. Test vectors") ----------------

# RFC 8032 section 7.1, test 1: a well-known Ed25519 secret key, so anyone can rebuild it.
SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
PUBLIC_KEY_B64 = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
KEY = Ed25519PrivateKey.from_private_bytes(SEED)
DEVICE = "tab-07"

VECTOR_1 = GrantBody(
    grant_id="call-2024-0001",
    device_id="tab-07",
    contact_label='Élodie "Lou" Martin',
    not_before_ms=1717243200000,
    not_after_ms=1717245000000,
    max_duration_s=1200,
    nonce="q83vEjRWeJCrze8SNFZ4kA",
    issued_at_ms=1717156800000,
)
VECTOR_1_BYTES = (
    b'tabletd-grant-v1\n{"contact_label":"\xc3\x89lodie \\"Lou\\" Martin","device_id":"tab-07",'
    b'"grant_id":"call-2024-0001","issued_at_ms":1717156800000,"max_duration_s":1200,'
    b'"nonce":"q83vEjRWeJCrze8SNFZ4kA","not_after_ms":1717245000000,'
    b'"not_before_ms":1717243200000}'
)
VECTOR_1_SIGNATURE = (
    "FZX/DVe+ixYZQu/ld5tEf+t5Wj7GszPRxVLONvEASLGkLywZGIZ/tvg6CVRSK+k5B+oYoe8mPHeg4FwKbnZjBA=="
)

# The escaping corner cases: backslash, quote, <&> (Go escapes them by default), tab and backspace
# (short escapes), U+001F (\u001f, lower-case hex), DEL and U+2028 (raw), a non-BMP character (raw
# UTF-8, not a surrogate pair); integers at their bounds.
VECTOR_2 = GrantBody(
    grant_id="g_2.x-9",
    device_id="tab-07",
    contact_label='C:\\ "x" <&>\t\b\x1f\x7f\u2028\U0001f600',
    not_before_ms=0,
    not_after_ms=9007199254740991,
    max_duration_s=7200,
    nonce="A" * 64,
    issued_at_ms=9007198649940991,
)
VECTOR_2_HEX = (
    "7461626c6574642d6772616e742d76310a7b22636f6e746163745f6c6162656c223a22433a5c5c205c22785c"
    "22203c263e5c745c625c75303031667fe280a8f09f9880222c226465766963655f6964223a227461622d3037"
    "222c226772616e745f6964223a22675f322e782d39222c226973737565645f61745f6d73223a393030373139"
    "383634393934303939312c226d61785f6475726174696f6e5f73223a373230302c226e6f6e6365223a224141"
    "4141414141414141414141414141414141414141414141414141414141414141414141414141414141414141"
    "414141414141414141414141414141414141222c226e6f745f61667465725f6d73223a393030373139393235"
    "343734303939312c226e6f745f6265666f72655f6d73223a307d"
)
VECTOR_2_SIGNATURE = (
    "B8if3JYklYFjZsGYC3N/EU/VnDObtY9HVJjPhIrWELZ8TXzPRR9DLz1lq/RXBD6wRk3JmYNn86nsHbDopm6xCg=="
)

# ---- a fixed world ------------------------------------------------------------------------

SERVER_MS = 1_717_240_000_000  # the server's clock in welcome
T0 = 5_000 * S  # boot clock just before hello
T1 = T0 + 40 * MS  # boot clock at welcome: a 40 ms round trip
MAPPING = ClockMapping(server_ms=SERVER_MS, t0_ns=T0, t1_ns=T1)
NOW = T1  # the grant arrives right after the exchange


def body(**changes: object) -> GrantBody:
    """A valid grant for DEVICE: starts in 5 minutes, hard end in 35, 20 minutes long."""
    base = GrantBody(
        grant_id="call-1",
        device_id=DEVICE,
        contact_label="Maman",
        not_before_ms=SERVER_MS + 5 * MIN_MS,
        not_after_ms=SERVER_MS + 35 * MIN_MS,
        max_duration_s=1200,
        nonce="nonce-0123456789abcdefgh",
        issued_at_ms=SERVER_MS - MIN_MS,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def verifier(tmp_path: Path) -> GrantVerifier:
    return GrantVerifier(load_public_key(PUBLIC_KEY_B64), DEVICE, NonceStore(tmp_path))


def refused(v: GrantVerifier, b: GrantBody, sig: str | None = None,
            mapping: ClockMapping | None = MAPPING, now: int = NOW) -> str:
    with pytest.raises(GrantRefused) as info:
        v.verify(b, sign_grant(b, KEY) if sig is None else sig, mapping, now)
    return info.value.code


# ---- canonical encoding, keys, test vectors ----------------------------------------------


def test_public_key_is_derived_from_the_seed() -> None:
    raw = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert base64.b64encode(raw).decode() == PUBLIC_KEY_B64


def test_vector_1_canonical_bytes_and_signature() -> None:
    assert canonical_grant_bytes(VECTOR_1) == VECTOR_1_BYTES
    assert sign_grant(VECTOR_1, KEY) == VECTOR_1_SIGNATURE  # Ed25519 is deterministic
    load_public_key(PUBLIC_KEY_B64).verify(base64.b64decode(VECTOR_1_SIGNATURE), VECTOR_1_BYTES)


def test_vector_2_canonical_bytes_and_signature() -> None:
    assert canonical_grant_bytes(VECTOR_2) == bytes.fromhex(VECTOR_2_HEX)
    assert sign_grant(VECTOR_2, KEY) == VECTOR_2_SIGNATURE
    load_public_key(PUBLIC_KEY_B64).verify(base64.b64decode(VECTOR_2_SIGNATURE),
                                           bytes.fromhex(VECTOR_2_HEX))


def test_vectors_accepted_by_the_verifier(verifier: GrantVerifier) -> None:
    mapping = ClockMapping(server_ms=VECTOR_1.issued_at_ms, t0_ns=T0, t1_ns=T1)
    grant = verifier.verify(VECTOR_1, VECTOR_1_SIGNATURE, mapping, T1)
    assert grant.session_id == "call-2024-0001"
    assert grant.contact_label == 'Élodie "Lou" Martin'
    mapping = ClockMapping(server_ms=VECTOR_2.issued_at_ms, t0_ns=T0, t1_ns=T1)
    assert verifier.verify(VECTOR_2, VECTOR_2_SIGNATURE, mapping, T1).max_duration_ns == 7200 * S


def test_protocol_appendix_carries_the_same_vectors() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    appendix = doc[doc.index("## Appendix A. Test vectors"):]
    compact = "".join(appendix.split())
    for text in (SEED.hex(), PUBLIC_KEY_B64, VECTOR_1_BYTES.hex(), VECTOR_1_SIGNATURE,
                 VECTOR_2_HEX, VECTOR_2_SIGNATURE):
        assert text in compact
    # and the JSON shown there is the body the vector encodes
    for vector in (VECTOR_1, VECTOR_2):
        shown = json.dumps(dataclasses.asdict(vector), sort_keys=True, separators=(",", ":"))
        assert "".join(shown.split()) in compact


def test_canonical_bytes_refuse_non_grant_types() -> None:
    with pytest.raises(TypeError):
        canonical_grant_bytes(body(max_duration_s=True))
    with pytest.raises(TypeError):
        canonical_grant_bytes(body(contact_label=None))
    with pytest.raises(ValueError, match="surrogate"):
        canonical_grant_bytes(body(contact_label="\ud800"))


@pytest.mark.parametrize(("text", "match"), [
    ("not base64!", "not valid base64"),
    ("11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo", "not valid base64"),  # padding missing
    (base64.b64encode(bytes(31)).decode(), "31 bytes"),
    (base64.b64encode(bytes(64)).decode(), "64 bytes"),
    ("", "0 bytes"),
])
def test_load_public_key_says_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(GrantKeyError, match=match) as info:
        load_public_key(text)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TabletdError)


def test_load_public_key_tolerates_surrounding_white_space() -> None:
    load_public_key(f"  {PUBLIC_KEY_B64}\n")


# ---- acceptance ----------------------------------------------------------------------------


def test_accepted_grant_is_mapped_to_the_boot_clock(verifier: GrantVerifier) -> None:
    b = body()
    grant = verifier.verify(b, sign_grant(b, KEY), MAPPING, NOW)
    assert grant == Grant(
        session_id="call-1",
        device_id=DEVICE,
        contact_label="Maman",
        not_before_ns=T1 + 5 * MIN_MS * MS,  # latest: X - S + t1
        not_after_ns=T0 + 35 * MIN_MS * MS,  # earliest: X - S + t0
        max_duration_ns=1200 * S,
    )
    assert verifier.nonces.seen(b.nonce)


def test_not_yet_valid_grant_is_accepted_and_scheduled(verifier: GrantVerifier) -> None:
    b = body(not_before_ms=SERVER_MS + 2 * DAY_MS, not_after_ms=SERVER_MS + 2 * DAY_MS + HOUR_MS)
    grant = verifier.verify(b, sign_grant(b, KEY), MAPPING, NOW)
    assert grant.not_before_ns > NOW  # the session machine refuses an early start


# ---- refusals ------------------------------------------------------------------------------


def test_forged_signature(verifier: GrantVerifier) -> None:
    b = body()
    forger = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert refused(verifier, b, sign_grant(b, forger)) == "bad_signature"
    assert not verifier.nonces.seen(b.nonce)


@pytest.mark.parametrize(("name", "value"), [
    ("grant_id", "call-2"),
    ("device_id", "tab-08"),
    ("contact_label", "Papa"),
    ("not_before_ms", SERVER_MS + 4 * MIN_MS),
    ("not_after_ms", SERVER_MS + 36 * MIN_MS),
    ("max_duration_s", 1201),
    ("nonce", "nonce-0123456789abcdefgX"),
    ("issued_at_ms", SERVER_MS - MIN_MS + 1),
])
def test_tampered_body(verifier: GrantVerifier, name: str, value: object) -> None:
    sig = sign_grant(body(), KEY)
    assert refused(verifier, body(**{name: value}), sig) == "bad_signature"


@pytest.mark.parametrize("sig", [
    "",
    "!!!!",
    sign_grant(body(), KEY).rstrip("="),  # padding missing
    " " + sign_grant(body(), KEY),
    sign_grant(body(), KEY) + "\n",
    base64.b64encode(bytes(63)).decode(),
    base64.b64encode(bytes(65)).decode(),
    base64.urlsafe_b64encode(b"\xfb" * 64).decode(),  # the other alphabet
    "é" * 88,
])
def test_malformed_signature(verifier: GrantVerifier, sig: str) -> None:
    assert refused(verifier, body(), sig) == "bad_signature"


def test_signature_of_wrong_type(verifier: GrantVerifier) -> None:
    with pytest.raises(GrantRefused) as info:
        verifier.verify(body(), None, MAPPING, NOW)  # type: ignore[arg-type]
    assert info.value.code == "bad_signature"


def test_foreign_device(verifier: GrantVerifier) -> None:
    assert refused(verifier, body(device_id="tab-08")) == "foreign_device"


def test_no_mapping(verifier: GrantVerifier) -> None:
    assert refused(verifier, body(), mapping=None) == "no_clock"


def test_expired_on_the_earliest_mapped_end(verifier: GrantVerifier) -> None:
    end = MAPPING.not_after_boot_ns(body().not_after_ms)
    assert refused(verifier, body(), now=end) == "expired"
    assert refused(verifier, body(), now=end + HOUR_MS * MS) == "expired"
    assert verifier.verify(body(), sign_grant(body(), KEY), MAPPING, end - 1).not_after_ns == end


def test_replayed(verifier: GrantVerifier) -> None:
    b = body()
    verifier.verify(b, sign_grant(b, KEY), MAPPING, NOW)
    assert refused(verifier, b) == "replayed"
    # the same nonce under another (signed) body is still a replay
    assert refused(verifier, body(grant_id="call-2")) == "replayed"


def test_replayed_after_reloading_the_store(tmp_path: Path) -> None:
    b = body()
    first = GrantVerifier(load_public_key(PUBLIC_KEY_B64), DEVICE, NonceStore(tmp_path))
    first.verify(b, sign_grant(b, KEY), MAPPING, NOW)
    # a restarted daemon, and a new connection with a new mapping
    again = GrantVerifier(load_public_key(PUBLIC_KEY_B64), DEVICE, NonceStore(tmp_path))
    later = ClockMapping(server_ms=SERVER_MS + MIN_MS, t0_ns=T0 + MIN_MS * MS,
                         t1_ns=T1 + MIN_MS * MS)
    assert refused(again, b, mapping=later, now=later.t1_ns) == "replayed"


@pytest.mark.parametrize("changes", [
    {"not_after_ms": SERVER_MS + 5 * MIN_MS},  # == not_before
    {"not_after_ms": SERVER_MS + 4 * MIN_MS},  # < not_before
    {"max_duration_s": 0},
    {"max_duration_s": 7201},
    {"issued_at_ms": SERVER_MS + 35 * MIN_MS - 7 * DAY_MS - 1},
    {"grant_id": ""},
    {"grant_id": "call 1"},
    {"grant_id": "x" * 65},
    {"grant_id": "call-1\n"},
    {"contact_label": "x" * 65},
    {"nonce": "short"},
    {"nonce": "n" * 65},
    {"nonce": "nonce+0123456789abcdefgh"},
    {"nonce": "nonce-0123456789abcdefgh="},
    {"not_before_ms": -1},
    {"issued_at_ms": 2**53},
    {"max_duration_s": True},
    {"not_after_ms": float(SERVER_MS + 35 * MIN_MS)},
    {"contact_label": None},
    {"contact_label": "\udc00"},
])
def test_bad_message(verifier: GrantVerifier, changes: dict[str, object]) -> None:
    b = body(**changes)
    sig = sign_grant(body(), KEY) if _unsignable(b) else None
    assert refused(verifier, b, sig) == "bad_message"
    assert len(verifier.nonces) == 0


def _unsignable(b: GrantBody) -> bool:
    try:
        canonical_grant_bytes(b)
    except (TypeError, ValueError):
        return True
    return False


def test_seven_days_exactly_is_accepted(verifier: GrantVerifier) -> None:
    b = body(issued_at_ms=SERVER_MS + 35 * MIN_MS - 7 * DAY_MS)
    verifier.verify(b, sign_grant(b, KEY), MAPPING, NOW)


def test_check_order(verifier: GrantVerifier) -> None:
    forged = sign_grant(body(device_id="tab-08"), Ed25519PrivateKey.generate())
    assert refused(verifier, body(device_id="tab-08"), forged) == "bad_signature"
    assert refused(verifier, body(device_id="tab-08"), mapping=None) == "foreign_device"
    assert refused(verifier, body(max_duration_s=0), mapping=None) == "no_clock"
    assert refused(verifier, body(max_duration_s=0), now=T0 + DAY_MS * MS) == "bad_message"
    b = body()
    verifier.verify(b, sign_grant(b, KEY), MAPPING, NOW)
    assert refused(verifier, b, now=T0 + DAY_MS * MS) == "expired"


def test_refusal_is_a_tabletd_error_and_a_value_error() -> None:
    err = GrantRefused("replayed", "again")
    assert isinstance(err, TabletdError)
    assert isinstance(err, ValueError)
    assert (err.code, err.detail, str(err)) == ("replayed", "again", "replayed: again")


# ---- the clock mapping ---------------------------------------------------------------------


def test_from_exchange() -> None:
    assert ClockMapping.from_exchange(T0, T1, SERVER_MS) == MAPPING
    assert ClockMapping.from_exchange(T0, T0, SERVER_MS) is not None
    assert ClockMapping.from_exchange(T0, T0 + 2000 * MS, SERVER_MS) is not None
    assert ClockMapping.from_exchange(T0, T0 + 2000 * MS + 1, SERVER_MS) is None
    assert ClockMapping.from_exchange(T0, T0 + 500 * MS, SERVER_MS, max_rtt_ms=400) is None
    assert ClockMapping.from_exchange(T1, T0, SERVER_MS) is None


@pytest.mark.parametrize("skew_ms", [-HOUR_MS, 0, HOUR_MS])
def test_server_clock_skew_is_absorbed(tmp_path: Path, skew_ms: int) -> None:
    """A server whose clock is an hour off signs windows in its own (wrong) time: the mapping
    is made from the same clock, so the grant is valid and the boot deadline is the same."""
    true_ms = SERVER_MS
    server_now = true_ms + skew_ms
    mapping = ClockMapping.from_exchange(T0, T1, server_now)
    assert mapping is not None
    b = body(not_before_ms=server_now + 5 * MIN_MS, not_after_ms=server_now + 35 * MIN_MS,
             issued_at_ms=server_now)
    v = GrantVerifier(load_public_key(PUBLIC_KEY_B64), DEVICE, NonceStore(tmp_path))
    grant = v.verify(b, sign_grant(b, KEY), mapping, NOW)
    assert grant.not_after_ns == T0 + 35 * MIN_MS * MS
    assert grant.not_before_ns == T1 + 5 * MIN_MS * MS


def test_skewed_grant_against_an_unskewed_mapping_is_expired(verifier: GrantVerifier) -> None:
    """A grant signed by a server an hour behind, mapped with a correct clock, has ended."""
    b = body(not_before_ms=SERVER_MS - HOUR_MS + 5 * MIN_MS,
             not_after_ms=SERVER_MS - HOUR_MS + 35 * MIN_MS, issued_at_ms=SERVER_MS - HOUR_MS)
    assert refused(verifier, b) == "expired"


def test_a_long_round_trip_ends_the_call_earlier() -> None:
    """Same server reading, same reception instant: the longer the round trip, the earlier
    the mapped end and the later the mapped start; never the other way."""
    x_end, x_start = SERVER_MS + 35 * MIN_MS, SERVER_MS + 5 * MIN_MS
    fast = ClockMapping.from_exchange(T1 - 10 * MS, T1, SERVER_MS)
    slow = ClockMapping.from_exchange(T1 - 1900 * MS, T1, SERVER_MS)
    assert fast is not None
    assert slow is not None
    assert slow.not_after_boot_ns(x_end) == fast.not_after_boot_ns(x_end) - 1890 * MS
    assert slow.not_before_boot_ns(x_start) == fast.not_before_boot_ns(x_start)
    # and with the same send instant, a later reception delays the start, not the end
    late = ClockMapping.from_exchange(T0, T0 + 1900 * MS, SERVER_MS)
    quick = ClockMapping.from_exchange(T0, T0 + 10 * MS, SERVER_MS)
    assert late is not None
    assert quick is not None
    assert late.not_after_boot_ns(x_end) == quick.not_after_boot_ns(x_end)
    assert late.not_before_boot_ns(x_start) == quick.not_before_boot_ns(x_start) + 1890 * MS


@given(
    server_ms=st.integers(0, 2**53 - 1),
    t0=st.integers(0, 10**15),
    rtt=st.integers(0, 2000 * MS),
    read_at=st.fractions(0, 1),
    x=st.integers(0, 2**53 - 1),
    length_ms=st.integers(1, 7 * DAY_MS),
    now_offset=st.integers(-(10**12), 10**12),
)
def test_mapping_errs_early_for_every_consistent_truth(  # noqa: PLR0917 - hypothesis draws
        server_ms: int, t0: int, rtt: int, read_at: Fraction, x: int, length_ms: int,
        now_offset: int) -> None:
    t1 = t0 + rtt
    mapping = ClockMapping.from_exchange(t0, t1, server_ms)
    assert mapping is not None
    # the server read its clock at some boot instant b in [t0, t1]; X then happens at
    # b + (X - S) ms on the boot clock, whatever b was
    b = t0 + read_at * rtt
    true_x = b + (x - server_ms) * MS
    assert mapping.not_after_boot_ns(x) <= true_x <= mapping.not_before_boot_ns(x)
    # a mapped window is never longer than the server's
    mapped = mapping.not_after_boot_ns(x + length_ms) - mapping.not_before_boot_ns(x)
    assert mapped <= length_ms * MS
    assert mapped == length_ms * MS - rtt
    # the earliest server "now" is never later than the true server time
    now = t1 + now_offset
    true_server_now = Fraction(server_ms) + Fraction(now - b, MS)
    assert mapping.server_now_ms_earliest(now) <= true_server_now


# ---- the nonce store -----------------------------------------------------------------------


def test_store_round_trip_and_prune(tmp_path: Path) -> None:
    store = NonceStore(tmp_path)
    assert len(store) == 0
    store.add("a" * 22, 1_000)
    store.add("b" * 22, 2_000)
    reloaded = NonceStore(tmp_path)
    assert reloaded.seen("a" * 22)
    assert reloaded.seen("b" * 22)
    assert not reloaded.seen("c" * 22)
    assert reloaded.prune(999) == 0
    assert reloaded.prune(1_000) == 1  # at not_after the grant is over
    assert not reloaded.seen("a" * 22)
    assert reloaded.seen("b" * 22)
    assert not NonceStore(tmp_path).seen("a" * 22)  # pruning is written too
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content", [
    b"",
    b"{not json",
    b"\xff\xfe",
    b"[]",
    b'{"format": 2, "nonces": {}}',
    b'{"format": 1}',
    b'{"format": 1, "nonces": []}',
    b'{"format": 1, "nonces": {"aaaaaaaaaaaaaaaaaaaaaa": "soon"}}',
    b'{"format": 1, "nonces": {"aaaaaaaaaaaaaaaaaaaaaa": true}}',
])
def test_corrupt_store_is_an_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "grant-nonces.json").write_bytes(content)
    with pytest.raises(NonceStoreError) as info:
        NonceStore(tmp_path)
    assert str(tmp_path / "grant-nonces.json") in str(info.value)
    assert isinstance(info.value, TabletdError)


def test_full_store_refuses_rather_than_forgets(tmp_path: Path) -> None:
    v = GrantVerifier(load_public_key(PUBLIC_KEY_B64), DEVICE, NonceStore(tmp_path, max_nonces=3))
    nonces = [f"nonce-{i:018d}" for i in range(4)]
    for i, nonce in enumerate(nonces[:3]):
        b = body(grant_id=f"call-{i}", nonce=nonce)
        v.verify(b, sign_grant(b, KEY), MAPPING, NOW)
    fourth = body(grant_id="call-3", nonce=nonces[3])
    assert refused(v, fourth) == "refused"
    assert all(v.nonces.seen(n) for n in nonces[:3])
    assert not v.nonces.seen(nonces[3])
    # once the first three have expired (server time past not_after), there is room again
    later_ms = SERVER_MS + DAY_MS
    later = ClockMapping(server_ms=later_ms, t0_ns=T0 + DAY_MS * MS, t1_ns=T1 + DAY_MS * MS)
    fresh = body(grant_id="call-3", nonce=nonces[3], not_before_ms=later_ms,
                 not_after_ms=later_ms + HOUR_MS, issued_at_ms=later_ms)
    v.verify(fresh, sign_grant(fresh, KEY), later, later.t1_ns)
    assert len(v.nonces) == 1


def test_store_write_failure_refuses_and_remembers_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    v = GrantVerifier(load_public_key(PUBLIC_KEY_B64), DEVICE, NonceStore(state))
    shutil.rmtree(state)  # the state directory vanished: nothing can be made durable
    assert refused(v, body()) == "refused"
    assert not v.nonces.seen(body().nonce)
    state.mkdir()
    v.verify(body(), sign_grant(body(), KEY), MAPPING, NOW)  # a retry then succeeds


# ---- nothing but GrantRefused ------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300)
@given(sig=st.one_of(
    st.text(max_size=120),
    st.binary(max_size=80).map(lambda raw: base64.b64encode(raw).decode()),
    st.binary(min_size=64, max_size=64).map(lambda raw: base64.b64encode(raw).decode()),
    st.none(), st.integers(), st.binary(max_size=80),
))
def test_garbage_signatures_only_ever_refuse(verifier: GrantVerifier, sig: object) -> None:
    with pytest.raises(GrantRefused) as info:
        verifier.verify(body(), sig, MAPPING, NOW)  # type: ignore[arg-type]
    assert info.value.code == "bad_signature"


_any = st.one_of(st.text(max_size=80), st.integers(-(2**64), 2**64), st.booleans(), st.none(),
                 st.floats(allow_nan=True))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=300,
          deadline=None)
@given(
    values=st.fixed_dictionaries({
        f.name: st.one_of(st.just(getattr(body(), f.name)), _any)
        for f in dataclasses.fields(GrantBody)
    }),
    signed=st.booleans(),
    with_mapping=st.booleans(),
    now=st.integers(-(10**18), 10**18),
)
def test_garbage_bodies_are_accepted_or_refused(verifier: GrantVerifier, values: dict[str, object],
                                                signed: bool, with_mapping: bool,
                                                now: int) -> None:
    b = GrantBody(**values)  # type: ignore[arg-type]
    sig = VECTOR_1_SIGNATURE
    if signed and not _unsignable(b):
        sig = sign_grant(b, KEY)
    try:
        grant = verifier.verify(b, sig, MAPPING if with_mapping else None, now)
    except GrantRefused:
        return
    assert grant.device_id == DEVICE
    assert grant.not_after_ns > now
