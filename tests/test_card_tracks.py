from __future__ import annotations

import copy
import logging
import pickle
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atmguard.errors import CardDataError
from atmguard.hardware.card.tracks import (
    REASONS,
    CardRead,
    decode_raw,
    encode_raw,
    lrc_char,
    luhn_valid,
    parse_card,
    parse_swipe_line,
)

TODAY = date(2025, 6, 15)
PAN = "4111111111111111"


def t1(
    pan: str = PAN, yymm: str = "3012", svc: str = "201", name: str = "DOE/JOHN", dd: str = "1000000"
) -> str:
    return f"%B{pan}^{name}^{yymm}{svc}{dd}?"


def t2(pan: str = PAN, yymm: str = "3012", svc: str = "201", dd: str = "10000000") -> str:
    return f";{pan}={yymm}{svc}{dd}?"


def with_check_digit(body: str) -> str:
    for d in "0123456789":
        if luhn_valid(body + d):
            return body + d
    raise AssertionError("unreachable")


def reason_of(track1: str | None, track2: str | None, **kw) -> str:
    with pytest.raises(CardDataError) as info:
        parse_card(track1, track2, today=TODAY, **kw)
    assert info.value.reason in REASONS
    return info.value.reason


# -- valid cards --------------------------------------------------------------------------------


def test_both_tracks_give_masked_card():
    card = parse_card(t1(), t2(), today=TODAY)
    assert card.masked_pan == "411111******1111"
    assert card.last4 == "1111"
    assert (card.expiry_year, card.expiry_month) == (2030, 12)
    assert card.service_code == "201"
    assert card.tracks == {1, 2} and card.has_track1 and card.has_track2
    assert card.chip_card  # service code 2xx: chip card, a swipe is a fallback
    assert card.pan_length == 16


@pytest.mark.parametrize(
    ("pan", "lead"),
    [
        ("5500000000000004", 6),
        ("378282246310005", 5),  # 15 digits: fewer leading digits so 6 stay hidden
        (with_check_digit("41111111111"), 2),  # 12 digits
        (with_check_digit("411111111111111111"), 6),  # 19 digits
    ],
)
def test_pan_lengths_and_masking(pan, lead):
    masked = pan[:lead] + "*" * (len(pan) - lead - 4) + pan[-4:]
    card = parse_card(None, t2(pan=pan), today=TODAY)
    assert card.masked_pan == masked
    assert card.tracks == {2}
    assert sum(c.isdigit() for c in masked) <= 10
    assert masked.count("*") >= 6


def test_track1_only_with_empty_name_field():
    card = parse_card(t1(name=" /"), None, today=TODAY)
    assert card.tracks == {1} and not card.has_track2


def test_bytes_and_bytearray_input_accepted():
    card = parse_card(bytearray(t1().encode()), t2().encode(), today=TODAY)
    assert card.last4 == "1111"


def test_length_limits_count_the_lrc():
    longest2 = t2(dd="0" * 13)
    assert len(longest2) == 39
    assert parse_card(None, longest2, today=TODAY).tracks == {2}
    assert parse_card(None, longest2 + lrc_char(2, longest2), today=TODAY).tracks == {2}
    longest1 = t1(dd="0" * (78 - len(t1(dd=""))))
    assert parse_card(longest1 + lrc_char(1, longest1), None, today=TODAY).tracks == {1}
    assert reason_of(longest1[:-1] + "0?", None) == "too_long"


def test_track2_service_code_preferred_when_both_present():
    card = parse_card(t1(svc="101"), t2(svc="201"), today=TODAY)
    assert card.service_code == "201"


# -- each error reason --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("track1", "track2", "reason"),
    [
        (None, None, "no_track"),
        ("", "", "no_track"),
        (t1()[1:], None, "bad_sentinel"),  # no start sentinel
        (t1()[:-1], None, "bad_sentinel"),  # no end sentinel
        (None, t2()[:-1], "bad_sentinel"),
        (None, t2() + "12", "bad_sentinel"),  # more than one character after '?'
        (None, ";41111;11111111111=3012201?", "bad_sentinel"),  # start sentinel inside
        ("%B4111111111111111^DOE/JOHN^3012201\x01?", None, "bad_char"),
        (None, ";4111111111111111=3012201A?", "bad_char"),  # track 2 is 4-bit: no letters
        (t1(dd="0" * 60), None, "too_long"),
        (None, t2(dd="0" * 30), "too_long"),
        (None, t2(dd="0" * 14), "too_long"),  # 40 characters, no room left for the LRC
        ("%A4111111111111111^DOE/JOHN^3012201?", None, "bad_format"),
        ("%B4111111111111111DOE/JOHN3012201?", None, "bad_format"),
        (None, ";41111111111111113012201?", "bad_format"),
        (t1(name="X" * 27), None, "bad_format"),
        (None, t2(pan="41111111111"), "bad_pan"),  # 11 digits
        (None, t2(pan="4" * 20), "bad_pan"),
        (t1(pan="4111-1111-1111-1111"), None, "bad_pan"),
        (None, t2(pan="4111111111111112"), "luhn"),
        (t1(pan="4111111111111112"), None, "luhn"),
        (None, t2(yymm="3013"), "bad_expiry"),
        (None, t2(yymm="3000"), "bad_expiry"),
        (None, ";4111111111111111=30?", "bad_expiry"),
        (t1(yymm="30AB"), None, "bad_expiry"),
        (None, t2(yymm="2505"), "expired"),
        (None, ";4111111111111111=30122?", "bad_service_code"),
        (t1(pan="5500000000000004"), t2(), "track_mismatch"),
        (t1(yymm="2912"), t2(), "track_mismatch"),
    ],
)
def test_error_reasons(track1, track2, reason):
    assert reason_of(track1, track2) == reason


def test_error_messages_never_contain_pan_or_track():
    for track2 in (t2(pan="4111111111111112"), t2(yymm="2001"), t2(yymm="3013")):
        with pytest.raises(CardDataError) as info:
            parse_card(t1(), track2, today=TODAY)
        text = str(info.value) + repr(info.value)
        assert "41111111111111" not in text
        assert "DOE" not in text


def test_expiry_is_valid_through_the_end_of_the_month():
    card = parse_card(None, t2(yymm="2506"), today=date(2025, 6, 30))
    assert not card.is_expired(date(2025, 6, 30))
    assert card.is_expired(date(2025, 7, 1))
    with pytest.raises(CardDataError) as info:
        parse_card(None, t2(yymm="2506"), today=date(2025, 7, 1))
    assert info.value.reason == "expired"
    assert parse_card(None, t2(yymm="2601"), today=date(2025, 12, 31)).expiry_year == 2026


# -- Luhn and LRC ----------------------------------------------------------------------------------


def test_luhn():
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398710")
    assert not luhn_valid("")
    assert not luhn_valid("4111a")


def test_lrc_in_ascii_text_is_checked_when_present():
    good = t2() + lrc_char(2, t2())
    assert parse_card(None, good, today=TODAY).last4 == "1111"
    wrong = chr((ord(lrc_char(2, t2())) - 0x30 + 1) % 16 + 0x30)
    assert reason_of(None, t2() + wrong) == "bad_lrc"
    good1 = t1() + lrc_char(1, t1())
    assert parse_card(good1, None, today=TODAY).has_track1
    assert reason_of(None, t2(), lrc="required") == "bad_lrc"
    assert reason_of(None, good, lrc="absent") == "bad_sentinel"


def test_raw_stripe_codes_check_parity_and_lrc():
    for track, text in ((1, t1()), (2, t2())):
        codes = encode_raw(track, text)
        assert len(codes) == len(text) + 1
        bits = 7 if track == 1 else 5
        assert all(bin(c).count("1") % 2 == 1 and c < (1 << bits) for c in codes)  # odd parity
        assert decode_raw(track, codes) == text.encode()
        flipped_parity = bytes([codes[0] ^ (1 << (bits - 1))]) + codes[1:]
        with pytest.raises(CardDataError) as info:
            decode_raw(track, flipped_parity)
        assert info.value.reason == "bad_parity"
        # Change a data character and its parity bit together: only the LRC can notice.
        c = codes[3]
        other = next(
            v | ((bin(v).count("1") + 1) % 2) << (bits - 1)
            for v in range(1 << (bits - 1))
            if v != c & ((1 << (bits - 1)) - 1) and (v + (0x30 if track == 2 else 0x20)) not in b"%;?"
        )
        with pytest.raises(CardDataError) as info:
            decode_raw(track, codes[:3] + bytes([other]) + codes[4:])
        assert info.value.reason == "bad_lrc"


# -- CardRead protections -----------------------------------------------------------------------


def test_repr_str_and_logs_show_only_masked_pan(caplog):
    caplog.set_level(logging.DEBUG)
    card = parse_card(t1(), t2(), today=TODAY)
    logging.getLogger("test").info("card %s / %r", card, card)
    for text in (repr(card), str(card), caplog.text):
        assert PAN not in text
        assert "DOE" not in text
        assert "411111******1111" in text


def test_no_str_attribute_carries_track_data():
    card = parse_card(t1(), t2(), today=TODAY)
    for name in dir(card):
        if name.startswith("__"):
            continue
        value = getattr(card, name)
        if isinstance(value, str):
            assert PAN not in value and "DOE" not in value and "=" not in value, name


def test_card_read_is_read_only_and_not_copyable():
    card = parse_card(t1(), t2(), today=TODAY)
    with pytest.raises(AttributeError):
        card.expiry_year = 2040  # type: ignore[misc]
    with pytest.raises(AttributeError):
        card._pan = bytearray(b"0000")  # type: ignore[misc]
    with pytest.raises(TypeError):
        pickle.dumps(card)
    with pytest.raises(TypeError):
        copy.copy(card)


def test_wipe_erases_pan_and_keeps_masked_view():
    card = parse_card(t1(), t2(), today=TODAY)
    pan = card.pan_bytes()
    assert pan == PAN.encode()
    pan[:] = bytes(len(pan))
    internal = object.__getattribute__(card, "_pan")
    card.wipe()
    card.wipe()  # idempotent
    assert card.wiped
    assert set(internal) <= {0}
    assert card.masked_pan == "411111******1111"
    assert "wiped" in repr(card)
    for fn in (card.pan_bytes, lambda: card.pan_digest(b"k")):
        with pytest.raises(CardDataError) as info:
            fn()
        assert info.value.reason == "wiped"


def test_pan_digest_recognises_the_same_card_without_the_pan():
    a = parse_card(None, t2(), today=TODAY)
    b = parse_card(t1(), None, today=TODAY)
    c = parse_card(None, t2(pan="5500000000000004"), today=TODAY)
    assert a.pan_digest(b"key") == b.pan_digest(b"key") != c.pan_digest(b"key")
    assert a.pan_digest(b"key") != a.pan_digest(b"other")
    assert PAN not in a.pan_digest(b"key")


def test_constructor_rejects_non_pan():
    with pytest.raises(CardDataError):
        CardRead(
            bytearray(b"12ab"), expiry_year=2030, expiry_month=1, service_code="101", tracks=frozenset({2})
        )


# -- swipe lines (ASCII, no LRC) ---------------------------------------------------------------------


def test_swipe_line_variants():
    assert parse_swipe_line(t1() + t2(), today=TODAY).tracks == {1, 2}
    assert parse_swipe_line(t2(), today=TODAY).tracks == {2}
    assert parse_swipe_line(t1(), today=TODAY).tracks == {1}
    for line, reason in (
        ("", "no_track"),
        ("garbage", "bad_sentinel"),
        (t1() + "x" + t2(), "bad_sentinel"),
        ("%B4111111111111111^DOE", "bad_sentinel"),
        (t1() + t2(pan="4111111111111112"), "luhn"),
    ):
        with pytest.raises(CardDataError) as info:
            parse_swipe_line(line, today=TODAY)
        assert info.value.reason == reason, line


# -- properties -------------------------------------------------------------------------------------

_TRACKISH = st.text(alphabet="%;?^=B/ 0123456789AZ\x00~", max_size=90)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.none(), st.text(max_size=120), _TRACKISH),
    st.one_of(st.none(), st.binary(max_size=60), _TRACKISH),
)
def test_parser_raises_only_card_data_error(track1, track2):
    try:
        card = parse_card(track1, track2, today=TODAY)
    except CardDataError as exc:
        assert exc.reason in REASONS
    else:
        assert len(card.masked_pan) >= 12


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_swipe_line_and_raw_decoder_raise_only_card_data_error(data):
    for call in (
        lambda: parse_swipe_line(data, today=TODAY),
        lambda: decode_raw(1, data),
        lambda: decode_raw(2, data),
    ):
        try:
            call()
        except CardDataError as exc:
            assert exc.reason in REASONS


@st.composite
def valid_cards(draw):
    body = draw(st.text(alphabet="0123456789", min_size=11, max_size=18))
    pan = with_check_digit(body)
    yymm = f"{draw(st.integers(26, 99)):02d}{draw(st.integers(1, 12)):02d}"
    svc = draw(st.sampled_from(["101", "201", "120", "601", "999"]))
    name = draw(st.text(alphabet="ABCXYZ /.", max_size=26))
    dd1 = draw(st.text(alphabet="0123456789", max_size=78 - len(t1(pan, yymm, svc, name, ""))))
    dd2 = draw(st.text(alphabet="0123456789", max_size=39 - len(t2(pan, yymm, svc, ""))))
    return pan, yymm, svc, t1(pan, yymm, svc, name, dd1), t2(pan, yymm, svc, dd2)


@settings(max_examples=200, deadline=None)
@given(valid_cards(), st.booleans(), st.booleans())
def test_valid_cards_roundtrip(card_data, use1, add_lrc):
    pan, yymm, svc, track1, track2 = card_data
    in1, in2 = track1, track2
    if add_lrc:
        in1 += lrc_char(1, track1)
        in2 += lrc_char(2, track2)
    card = parse_card(in1 if use1 else None, in2, today=TODAY)
    assert card.last4 == pan[-4:]
    assert card.masked_pan.endswith(pan[-4:]) and card.masked_pan.count("*") >= 6
    assert (card.expiry_year, card.expiry_month) == (2000 + int(yymm[:2]), int(yymm[2:]))
    assert card.service_code == svc
    assert pan not in repr(card)
    assert decode_raw(1, encode_raw(1, track1)) == track1.encode()
    assert decode_raw(2, encode_raw(2, track2)) == track2.encode()
