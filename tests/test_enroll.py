"""`atmguard enroll`: bank-side face enrolment on a real MariaDB, with the real models and photos.

The photos are read in place from ../shared/datasets/faces-identity (symlinked into tmp folders,
never copied); the tests skip with a reason when that folder is absent.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mariadb_server import CentralTestDB, ThrowawayMariaDB
from PIL import Image, ImageFilter

from atmguard.cli import enroll_cmd
from atmguard.datasets import shared_datasets_dir
from atmguard.store.central import mask_pan, provision_account, set_card_status
from atmguard.store.enrolment import (
    ConsentRequiredError,
    delete_templates,
    find_account,
    list_templates,
    model_id_for,
    store_template,
)
from atmguard.vision.align import align_face
from atmguard.vision.detector import FaceDetector
from atmguard.vision.embedder import (
    TEMPLATE_BYTES,
    FaceEmbedder,
    FaceTemplate,
    Verdict,
    decide,
)
from atmguard.vision.evaluate import camera_frame
from atmguard.vision.imageops import load_rgb
from atmguard.vision.models import resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "firmware_models"
IDENTITY_DIR = shared_datasets_dir() / "faces-identity"
PERSON = "orl_s01"
OTHER_PERSON = "orl_s03"
SHARP_PERSON = "yale_subject02"  # large photos: a quarter-size copy is still a face, only too small

pytestmark = pytest.mark.skipif(not IDENTITY_DIR.is_dir(), reason=f"{IDENTITY_DIR} not available")

ADMIN_USER = "enrol_admin"
ADMIN_PASSWORD = "Enr0l-Admin-Pw"
PAN_KEY = b"test-pan-hmac-key-0123456789abcdef"
PEPPER = b"test-pin-pepper-0123456789abcdef"
_pan_numbers = itertools.count(1)


def _photos(person: str) -> list[Path]:
    return sorted((IDENTITY_DIR / person).glob("*.jpg"))


def _folder(tmp_path: Path, name: str, photos: list[Path]) -> Path:
    """A folder of symlinks to dataset photos (read in place, licence: never copied)."""
    folder = tmp_path / name
    folder.mkdir()
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    return folder


@pytest.fixture(scope="module")
def admin(mariadb_server: ThrowawayMariaDB) -> str:
    mariadb_server.create_user(ADMIN_USER, ADMIN_PASSWORD, admin=True)
    return ADMIN_USER


@pytest.fixture(scope="module")
def models():
    detector_spec = resolve_model(MODELS_DIR, "face_detector")
    embedder_spec = resolve_model(MODELS_DIR, "face_embedder")
    with (
        FaceDetector(detector_spec.path, expected_sha256=detector_spec.sha256) as detector,
        FaceEmbedder(embedder_spec.path, expected_sha256=embedder_spec.sha256) as embedder,
    ):
        yield detector, embedder


@pytest.fixture
def bank(tmp_path: Path, central_db: CentralTestDB, admin: str):
    """Config and admin arguments of a bank workstation talking to the test central database."""
    return _Bank(tmp_path, central_db, port=central_db.server.port)


class _Bank:
    def __init__(self, tmp_path: Path, db: CentralTestDB, *, port: int) -> None:
        self.db = db
        password_file = tmp_path / "admin.pw"
        password_file.write_text(ADMIN_PASSWORD + "\n")
        os.chmod(password_file, 0o600)
        key_file = tmp_path / "pan.key"
        key_file.write_bytes(PAN_KEY)
        os.chmod(key_file, 0o600)
        self.config = tmp_path / "bank.toml"
        self.config.write_text(
            f'[central]\nhost = "127.0.0.1"\nport = {port}\ndatabase = "{db.database}"\n'
            f'pan_key_file = "{key_file}"\nconnect_timeout_s = 2.0\n'
            f'[paths]\nmodels_dir = "{MODELS_DIR}"\n'
        )
        self.admin_args = ["--admin-user", ADMIN_USER, "--admin-password-file", str(password_file)]

    def run(self, *argv: str) -> int:
        parser = argparse.ArgumentParser(prog="atmguard")  # the shape of atmguard.cli.main
        parser.add_argument("--config")
        enroll_cmd.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["--config", str(self.config), "enroll", *argv, *self.admin_args])
        return args.handler(args)

    def new_card(self) -> tuple[str, bytes, int]:
        """(PAN, pan_hmac, account_id) of a freshly provisioned active card."""
        pan = f"4{os.getpid() % 100000:05d}{next(_pan_numbers):010d}"
        conn = self.db.admin()
        try:
            card_hmac = provision_account(conn, pan.encode(), b"1234", pan_key=PAN_KEY, pepper=PEPPER)
            with conn.cursor() as cursor:
                cursor.execute("SELECT account_id FROM accounts WHERE pan_hmac = %s", (card_hmac,))
                (account_id,) = cursor.fetchone()
        finally:
            conn.close()
        return pan, card_hmac, int(account_id)

    def rows(self, account_id: int) -> list[tuple]:
        return self.db.server.execute(
            "SELECT template, consent, consent_at, model_id FROM face_templates WHERE account_id = %s",
            (account_id,),
            database=self.db.database,
        )


def _atm_templates(db: CentralTestDB, card_hmac: bytes, model_id: str) -> list[bytes]:
    """What an ATM logged in with its own restricted account reads for the card it holds."""
    store = db.store(db.add_atm())
    try:
        return store.face_templates(card_hmac, model_id=model_id)
    finally:
        store.close()


def _embedding(models, photo: Path):
    detector, embedder = models
    frame = camera_frame(load_rgb(photo))
    faces = detector.detect(frame)
    aligned = align_face(frame, faces[0])
    assert aligned.ok, aligned.reason
    return embedder.embed(aligned)


def test_enrol_stores_only_the_template_and_the_atm_reads_it_for_that_card_only(
    bank, models, tmp_path, capsys
):
    _, card_hmac, account_id = bank.new_card()
    _, other_hmac, _ = bank.new_card()
    photos = _folder(tmp_path, "photos", _photos(PERSON)[:5])

    assert bank.run(str(account_id), "--images", str(photos), "--consent") == 0
    out = capsys.readouterr().out
    assert sum(".jpg  accepted" in line for line in out.splitlines()) == 5
    assert "the photos were not stored" in out

    rows = bank.rows(account_id)
    assert len(rows) == 1
    blob, consent, consent_at, model_id = rows[0]
    # The row holds the template record and nothing else: no photo fits in TEMPLATE_BYTES.
    assert len(blob) == TEMPLATE_BYTES
    assert FaceTemplate.from_bytes(blob).image_count == 5
    assert consent and consent_at is not None
    assert model_id == model_id_for(models[1])

    assert _atm_templates(bank.db, card_hmac, model_id) == [bytes(blob)]
    assert _atm_templates(bank.db, other_hmac, model_id) == []
    assert _atm_templates(bank.db, card_hmac, "face_embedder@0000000000000000") == []

    # Enrolling again replaces the template: still exactly one for this account and model.
    assert bank.run(str(account_id), "--images", str(photos), "--consent", "--json") == 0
    assert json.loads(capsys.readouterr().out)["stored"] is True
    assert len(bank.rows(account_id)) == 1


def test_without_consent_nothing_is_stored_and_the_atm_gets_nothing(bank, models, tmp_path, capsys):
    _, card_hmac, account_id = bank.new_card()
    photos = _folder(tmp_path, "photos", _photos(PERSON)[:5])

    assert bank.run(str(account_id), "--images", str(photos)) == 64
    assert "consent" in capsys.readouterr().err
    assert bank.rows(account_id) == []
    assert _atm_templates(bank.db, card_hmac, model_id_for(models[1])) == []

    # The library refuses as well, whoever calls it.
    embedder = models[1]
    template = embedder.template([_embedding(models, p) for p in _photos(PERSON)[:3]]).to_bytes()
    conn = bank.db.admin()
    try:
        with pytest.raises(ConsentRequiredError):
            store_template(
                conn,
                account_id,
                model_id=model_id_for(embedder),
                template=template,
                consent=False,
                consent_at=datetime.now(UTC),
            )
    finally:
        conn.close()
    assert bank.rows(account_id) == []

    # A row whose consent was withdrawn (flag cleared by hand) is not served to an ATM either.
    bank.db.server.execute(
        "INSERT INTO face_templates (account_id, model_id, template, consent) VALUES (%s, %s, %s, FALSE)",
        (account_id, model_id_for(embedder), template),
        database=bank.db.database,
    )
    assert _atm_templates(bank.db, card_hmac, model_id_for(embedder)) == []


def test_delete_erases_the_template(bank, models, tmp_path, capsys):
    _, card_hmac, account_id = bank.new_card()
    photos = _folder(tmp_path, "photos", _photos(PERSON)[:4])
    assert bank.run(str(account_id), "--images", str(photos), "--consent") == 0
    model_id = model_id_for(models[1])
    assert len(_atm_templates(bank.db, card_hmac, model_id)) == 1
    capsys.readouterr()

    assert bank.run(str(account_id), "--delete") == 0
    assert "erased 1 face template(s)" in capsys.readouterr().out
    assert bank.rows(account_id) == []  # the row is gone, not flagged
    assert _atm_templates(bank.db, card_hmac, model_id) == []

    assert bank.run(str(account_id), "--delete", "--json") == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 0


def test_bad_photos_are_rejected_with_reasons_and_the_rest_accepted(bank, models, tmp_path, capsys):
    _, _, account_id = bank.new_card()
    good = _photos(SHARP_PERSON)[:4]
    photos = _folder(tmp_path, "photos", good)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    with Image.open(good[0]) as image:
        width, height = image.size
        # A corner of the backdrop, enlarged to photo size: no face in it.
        image.crop((0, 0, width // 5, height // 5)).resize((width, height)).save(photos / "background.png")
        # A quarter-size, blurred copy: the face is there but useless for a template.
        small = image.resize((width // 4, height // 4)).filter(ImageFilter.GaussianBlur(1))
        small.save(photos / "tiny_blurred.png")

    assert bank.run(str(account_id), "--images", str(photos), "--consent", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    by_name = {image["name"]: image for image in result["images"]}
    assert by_name["broken.jpg"]["status"] == "unreadable"
    assert by_name["background.png"]["status"] == "no_face"
    assert by_name["tiny_blurred.png"]["status"] in {"too_small", "blurred", "low_score", "no_face"}
    for name in ("broken.jpg", "background.png", "tiny_blurred.png"):
        assert not by_name[name]["accepted"] and by_name[name]["reason"]
    assert sorted(n for n, image in by_name.items() if image["accepted"]) == sorted(p.name for p in good)
    assert result["stored"] is True
    assert FaceTemplate.from_bytes(bank.rows(account_id)[0][0]).image_count == 4

    # The text table names each rejected photo with its reason.
    assert bank.run(str(account_id), "--images", str(photos), "--consent") == 0
    lines = capsys.readouterr().out.splitlines()
    broken = next(line for line in lines if "broken.jpg" in line)
    assert "rejected" in broken and "unreadable" in broken


def test_a_photo_of_someone_else_is_rejected(bank, models, tmp_path, capsys):
    _, _, account_id = bank.new_card()
    intruder = _photos(OTHER_PERSON)[0]
    photos = _folder(tmp_path, "photos", _photos(PERSON)[:4])
    (photos / f"zz_{intruder.name}").symlink_to(intruder)

    assert bank.run(str(account_id), "--images", str(photos), "--consent", "--json") == 0
    images = {image["name"]: image for image in json.loads(capsys.readouterr().out)["images"]}
    assert images[f"zz_{intruder.name}"]["status"] == "inconsistent"
    assert sum(image["accepted"] for image in images.values()) == 4
    assert FaceTemplate.from_bytes(bank.rows(account_id)[0][0]).image_count == 4


def test_too_few_good_photos_store_nothing_and_keep_the_old_template(bank, models, tmp_path, capsys):
    _, card_hmac, account_id = bank.new_card()
    model_id = model_id_for(models[1])
    assert (
        bank.run(str(account_id), "--images", str(_folder(tmp_path, "ok", _photos(PERSON)[:4])), "--consent")
        == 0
    )
    before = _atm_templates(bank.db, card_hmac, model_id)
    capsys.readouterr()

    few = _folder(tmp_path, "few", _photos(OTHER_PERSON)[:2])
    (few / "broken.jpg").write_bytes(b"GIF89a truncated")
    assert bank.run(str(account_id), "--images", str(few), "--consent") == 65
    captured = capsys.readouterr()
    assert "nothing stored" in captured.err and "stored face template" not in captured.out
    assert _atm_templates(bank.db, card_hmac, model_id) == before  # the old template is untouched

    _, fresh_hmac, fresh_account = bank.new_card()
    assert bank.run(str(fresh_account), "--images", str(few), "--consent") == 65
    assert bank.rows(fresh_account) == []
    assert _atm_templates(bank.db, fresh_hmac, model_id) == []


def test_template_scores_higher_for_the_same_person(bank, models, tmp_path):
    _, card_hmac, account_id = bank.new_card()
    enrolment_photos, held_out = _photos(PERSON)[:5], _photos(PERSON)[5]
    assert (
        bank.run(str(account_id), "--images", str(_folder(tmp_path, "p", enrolment_photos)), "--consent") == 0
    )

    embedder = models[1]
    (blob,) = _atm_templates(bank.db, card_hmac, model_id_for(embedder))
    template = FaceTemplate.from_bytes(blob)
    same = embedder.compare(template, _embedding(models, held_out))
    other = embedder.compare(template, _embedding(models, _photos(OTHER_PERSON)[0]))
    assert same > other
    assert decide(same) is Verdict.MATCH
    assert decide(other) is not Verdict.MATCH


def test_account_named_by_card_number_on_stdin_is_shown_masked(bank, models, tmp_path, capsys, monkeypatch):
    pan, card_hmac, _ = bank.new_card()
    photos = _folder(tmp_path, "photos", _photos(PERSON)[:3])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(pan.encode() + b"\n")))

    assert bank.run("--pan-stdin", "--images", str(photos), "--consent") == 0
    captured = capsys.readouterr()
    assert mask_pan(pan.encode()) in captured.out
    assert pan not in captured.out + captured.err
    assert len(_atm_templates(bank.db, card_hmac, model_id_for(models[1]))) == 1

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"4000000000000002\n")))
    assert bank.run("--pan-stdin", "--delete") == enroll_cmd.EX_NOUSER
    assert "4000000000000002" not in capsys.readouterr().err


def test_errors_have_their_exit_codes(bank, models, tmp_path, capsys, mariadb_server):
    _, _, account_id = bank.new_card()
    photos = _folder(tmp_path, "photos", _photos(PERSON)[:3])

    assert bank.run(str(account_id), "--images", str(tmp_path / "missing"), "--consent") == 66
    assert "no such folder" in capsys.readouterr().err
    assert bank.run("999999999", "--images", str(photos), "--consent") == enroll_cmd.EX_NOUSER
    assert "no account 999999999" in capsys.readouterr().err

    _, closed_hmac, closed_account = bank.new_card()
    conn = bank.db.admin()
    try:
        set_card_status(conn, closed_hmac, "closed")
    finally:
        conn.close()
    assert bank.run(str(closed_account), "--images", str(photos), "--consent") == 65
    assert "is closed" in capsys.readouterr().err
    assert bank.rows(closed_account) == []

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    unreachable = _Bank(elsewhere, bank.db, port=_free_port())
    assert unreachable.run(str(account_id), "--images", str(photos), "--consent") == 69
    assert "unavailable" in capsys.readouterr().err
    assert bank.rows(account_id) == []


def test_store_level_erasure_and_listing(bank, models):
    _, _, account_id = bank.new_card()
    embedder = models[1]
    template = embedder.template([_embedding(models, p) for p in _photos(PERSON)[:3]]).to_bytes()
    conn = bank.db.admin()
    try:
        store_template(
            conn, account_id, model_id=model_id_for(embedder), template=template, consent=True,
            consent_at=datetime.now(UTC),
        )  # fmt: skip
        (stored,) = list_templates(conn, account_id)
        assert stored.template_bytes == TEMPLATE_BYTES and stored.consent
        account = find_account(conn, account_id)
        assert account is not None and "*" in account.pan_masked
        with pytest.raises(ValueError, match="does not name the model"):
            store_template(
                conn, account_id, model_id="face_embedder@ffffffffffffffff", template=template, consent=True,
                consent_at=datetime.now(UTC),
            )  # fmt: skip
        assert delete_templates(conn, account_id) == 1
        assert list_templates(conn, account_id) == []
    finally:
        conn.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
