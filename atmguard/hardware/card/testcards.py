"""Magnetic-stripe test cards for the simulator, the harness and the demo.

Builds ISO/IEC 7813 track 1 and track 2 text (with sentinels) for a PAN of the test ranges, so a
scenario can say "a valid card", "an expired card" or "a card failing Luhn" without spelling out
track data. Never use a real customer's PAN here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from atmguard.hardware.card.tracks import luhn_valid


def luhn_complete(prefix: str, *, length: int = 16) -> str:
    """``prefix`` padded with zeros to ``length - 1`` digits plus the Luhn check digit."""
    if not prefix.isdigit() or not 12 <= length <= 19 or len(prefix) >= length:
        raise ValueError("prefix must be digits shorter than length (12-19)")
    body = prefix.ljust(length - 1, "0")
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always satisfies Luhn")


def add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


@dataclass(frozen=True)
class TestCard:
    """Track text of one card: what the reader's head would read."""

    __test__ = False  # not a pytest test class

    track1: str
    track2: str

    @classmethod
    def build(
        cls,
        pan: str,
        *,
        expiry: date,
        name: str = "TEST/CARDHOLDER",
        service_code: str = "201",
        discretionary: str = "00000",
    ) -> TestCard:
        yymm = f"{expiry.year % 100:02d}{expiry.month:02d}"
        return cls(
            track1=f"%B{pan}^{name}^{yymm}{service_code}{discretionary}?",
            track2=f";{pan}={yymm}{service_code}{discretionary}?",
        )


def valid_card(*, today: date, prefix: str = "476173") -> TestCard:
    """A Luhn-valid card that expires two years after ``today``."""
    return TestCard.build(luhn_complete(prefix), expiry=add_months(today, 24))


def expired_card(*, today: date, prefix: str = "476173") -> TestCard:
    """A Luhn-valid card whose expiry month ended before ``today``."""
    return TestCard.build(luhn_complete(prefix + "9"), expiry=add_months(today, -2))


def luhn_failing_card(*, today: date, prefix: str = "476173") -> TestCard:
    """A card whose PAN fails the Luhn check (a mis-encoded or forged stripe)."""
    pan = luhn_complete(prefix + "5")
    wrong = pan[:-1] + str((int(pan[-1]) + 1) % 10)
    return TestCard.build(wrong, expiry=add_months(today, 24))
