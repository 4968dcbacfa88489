-- 0001: the central tables. Idempotent: every statement can run again without effect.
-- MySQL 8 and MariaDB 10.11: no MariaDB-only syntax (no CREATE OR REPLACE, no ADD COLUMN IF NOT EXISTS).
-- Character data is utf8mb4 with a binary collation: ids, uuids and hashes compare byte for byte.

-- schema_migrations is also created by the runner before it reads it; repeated here so the
-- schema is complete when this file is applied by hand.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INT UNSIGNED  NOT NULL PRIMARY KEY,
    name        VARCHAR(200)  NOT NULL,
    checksum    CHAR(64)      NOT NULL COMMENT 'sha256 (hex) of the migration file as applied',
    applied_at  DATETIME(6)   NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per ATM. db_user maps the MySQL account an ATM logs in with to its atm_id: the
-- procedures take the ATM's identity from the login, never from an argument.
CREATE TABLE IF NOT EXISTS atms (
    atm_id           VARCHAR(64)   NOT NULL PRIMARY KEY,
    db_user          VARCHAR(80)   NOT NULL,
    db_host          VARCHAR(255)  NOT NULL DEFAULT '%' COMMENT 'host part of the ATM account, for re-granting',
    location         VARCHAR(200)  NOT NULL DEFAULT '',
    description      VARCHAR(500)  NOT NULL DEFAULT '',
    created_at       DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    last_seen        DATETIME(6)   NULL,
    chain_head_seq   BIGINT UNSIGNED NOT NULL DEFAULT 0,
    chain_head_hash  CHAR(64)      NOT NULL DEFAULT '0000000000000000000000000000000000000000000000000000000000000000',
    UNIQUE KEY uq_atms_db_user (db_user)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Card accounts. No PAN and no PIN: pan_hmac = HMAC-SHA256(bank PAN key, PAN);
-- pin_verifier = SHA-256(pin_value), pin_value = the slow, salted, peppered KDF output the
-- ATM derives (see sql/README.md). pin_kdf names the KDF and its cost so they can evolve.
CREATE TABLE IF NOT EXISTS accounts (
    account_id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    pan_hmac             BINARY(32)    NOT NULL,
    pan_masked           VARCHAR(19)   NOT NULL DEFAULT '' COMMENT 'first 6 / last 4 at most',
    pin_salt             BINARY(16)    NOT NULL,
    pin_verifier         BINARY(32)    NOT NULL,
    pin_kdf              VARCHAR(64)   NOT NULL,
    status               ENUM('active','hot_listed','closed') NOT NULL DEFAULT 'active',
    failed_pin_attempts  TINYINT UNSIGNED NOT NULL DEFAULT 0,
    max_pin_attempts     TINYINT UNSIGNED NOT NULL DEFAULT 3,
    locked_at            DATETIME(6)   NULL,
    created_at           DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at           DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_accounts_pan_hmac (pan_hmac),
    CONSTRAINT ck_accounts_max_attempts CHECK (max_pin_attempts BETWEEN 1 AND 20)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Enrolled face templates, for face verification (issue 7). Only stored with recorded consent.
CREATE TABLE IF NOT EXISTS face_templates (
    template_id   BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    account_id    BIGINT UNSIGNED NOT NULL,
    model_id      VARCHAR(64)   NOT NULL COMMENT 'embedding model (name@version) that made the template',
    template      BLOB          NOT NULL,
    consent       BOOLEAN       NOT NULL DEFAULT FALSE,
    consent_at    DATETIME(6)   NULL,
    created_at    DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_face_templates_account (account_id, model_id),
    CONSTRAINT fk_face_templates_account FOREIGN KEY (account_id) REFERENCES accounts (account_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The ATMs' hash-chained journals. t_wall keeps the exact ISO 8601 text the hash covers.
CREATE TABLE IF NOT EXISTS events (
    id           BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    atm_id       VARCHAR(64)   NOT NULL,
    uuid         CHAR(36)      NOT NULL,
    seq          BIGINT UNSIGNED NOT NULL,
    kind         VARCHAR(64)   NOT NULL,
    t_wall       VARCHAR(32)   NOT NULL,
    session_id   VARCHAR(64)   NULL,
    payload      JSON          NOT NULL,
    prev_hash    CHAR(64)      NOT NULL,
    hash         CHAR(64)      NOT NULL,
    received_at  DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_events_uuid (uuid),
    UNIQUE KEY uq_events_atm_seq (atm_id, seq),
    KEY ix_events_session (session_id),
    CONSTRAINT fk_events_atm FOREIGN KEY (atm_id) REFERENCES atms (atm_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Sealed evidence snapshots: the blobs are sealed to the bank's key; sha256 (hex) covers
-- sealed_frame followed by sealed_crop and is itself in the chain via the event_uuid event.
CREATE TABLE IF NOT EXISTS snapshots (
    id                 BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    uuid               CHAR(36)      NOT NULL,
    atm_id             VARCHAR(64)   NOT NULL,
    event_uuid         CHAR(36)      NOT NULL,
    session_id         VARCHAR(64)   NULL,
    reason             VARCHAR(64)   NOT NULL,
    is_fraud_evidence  BOOLEAN       NOT NULL,
    t_wall             VARCHAR(32)   NOT NULL,
    sealed_frame       LONGBLOB      NOT NULL,
    sealed_crop        LONGBLOB      NULL,
    sha256             CHAR(64)      NOT NULL,
    received_at        DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_snapshots_uuid (uuid),
    KEY ix_snapshots_atm_time (atm_id, t_wall),
    KEY ix_snapshots_event (event_uuid),
    CONSTRAINT fk_snapshots_atm FOREIGN KEY (atm_id) REFERENCES atms (atm_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
