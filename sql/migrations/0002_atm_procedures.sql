-- 0002: the only way an ATM account reaches the data: SQL SECURITY DEFINER procedures.
--
-- An ATM's identity is taken from its login (USER(): the account the client authenticated as,
-- unlike CURRENT_USER(), which inside a DEFINER routine is the definer), mapped through
-- atms.db_user. Any atm_id argument must match it, so an ATM can neither write as another ATM
-- nor read another ATM's data. No procedure returns a PIN verifier.
--
-- Idempotent: DROP ... IF EXISTS then CREATE. Dropping a procedure also drops the EXECUTE
-- grants on it, so `atmguard db migrate` re-applies sql/grants/atm.sql for every registered ATM
-- after it applied anything.
--
-- Errors raised on purpose use SQLSTATE 45000 and a message prefix the client classifies:
--   ATMGUARD-DENIED    the login is not a registered ATM, or the record names another ATM
--   ATMGUARD-CONFLICT  a record with this uuid exists with different content
--   ATMGUARD-REJECT    this record can never be stored (e.g. its seq holds another event)

DROP PROCEDURE IF EXISTS hot_list_status;
DROP PROCEDURE IF EXISTS pin_salt;
DROP PROCEDURE IF EXISTS verify_pin;
DROP PROCEDURE IF EXISTS face_template;
DROP PROCEDURE IF EXISTS ingest_event;
DROP PROCEDURE IF EXISTS ingest_snapshot;
DROP PROCEDURE IF EXISTS atm_chain_head;

DELIMITER $$

-- Card status before PIN entry: one row (status, locked); status 'unknown' for an unknown card.
CREATE PROCEDURE hot_list_status(IN p_pan_hmac BINARY(32))
    READS SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: status of a card (active, hot_listed, closed, unknown) and whether its PIN is locked'
BEGIN
    DECLARE v_status VARCHAR(16);
    DECLARE v_locked BOOLEAN;
    IF (SELECT atm_id FROM atms WHERE db_user = SUBSTRING_INDEX(USER(), '@', 1)) IS NULL THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-DENIED: this login is not registered as an ATM';
    END IF;
    SET v_status = (SELECT status FROM accounts WHERE pan_hmac = p_pan_hmac);
    SET v_locked = (SELECT locked_at IS NOT NULL OR failed_pin_attempts >= max_pin_attempts
                      FROM accounts WHERE pan_hmac = p_pan_hmac);
    SELECT COALESCE(v_status, 'unknown') AS status, COALESCE(v_locked, FALSE) AS locked;
END$$

-- The per-account salt and KDF name the ATM needs to derive the PIN value; no row if unknown.
CREATE PROCEDURE pin_salt(IN p_pan_hmac BINARY(32))
    READS SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: salt and KDF name for deriving the PIN value of a card'
BEGIN
    IF (SELECT atm_id FROM atms WHERE db_user = SUBSTRING_INDEX(USER(), '@', 1)) IS NULL THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-DENIED: this login is not registered as an ATM';
    END IF;
    SELECT pin_salt, pin_kdf FROM accounts WHERE pan_hmac = p_pan_hmac;
END$$

-- Compare and count in one transaction, the account row locked (SELECT ... FOR UPDATE), so
-- concurrent tries from several ATMs are serialised and the counter lives with the account.
-- Returns one row (result, attempts_left); result is OK, WRONG_PIN, LOCKED, HOT_LISTED,
-- CLOSED or UNKNOWN_CARD. Call it with autocommit on: START TRANSACTION commits open work.
CREATE PROCEDURE verify_pin(IN p_atm_id VARCHAR(64), IN p_pan_hmac BINARY(32), IN p_pin_value VARBINARY(64))
    MODIFIES SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: check a derived PIN value, counting failures atomically; never returns the verifier'
BEGIN
    DECLARE v_caller VARCHAR(64);
    DECLARE v_account BIGINT UNSIGNED;
    DECLARE v_status VARCHAR(16);
    DECLARE v_verifier BINARY(32);
    DECLARE v_failed INT;
    DECLARE v_max INT;
    DECLARE v_locked_at DATETIME(6);
    DECLARE CONTINUE HANDLER FOR NOT FOUND SET v_account = NULL;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION
    BEGIN
        ROLLBACK;
        RESIGNAL;
    END;

    SET v_caller = (SELECT atm_id FROM atms WHERE db_user = SUBSTRING_INDEX(USER(), '@', 1));
    IF v_caller IS NULL OR p_atm_id IS NULL OR p_atm_id <> v_caller THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-DENIED: atm_id does not match this login';
    END IF;

    START TRANSACTION;
    SELECT account_id, status, pin_verifier, failed_pin_attempts, max_pin_attempts, locked_at
      INTO v_account, v_status, v_verifier, v_failed, v_max, v_locked_at
      FROM accounts
     WHERE pan_hmac = p_pan_hmac
       FOR UPDATE;
    IF v_account IS NULL THEN
        COMMIT;
        SELECT 'UNKNOWN_CARD' AS result, 0 AS attempts_left;
    ELSEIF v_status = 'hot_listed' THEN
        COMMIT;
        SELECT 'HOT_LISTED' AS result, 0 AS attempts_left;
    ELSEIF v_status = 'closed' THEN
        COMMIT;
        SELECT 'CLOSED' AS result, 0 AS attempts_left;
    ELSEIF v_locked_at IS NOT NULL OR v_failed >= v_max THEN
        COMMIT;
        SELECT 'LOCKED' AS result, 0 AS attempts_left;
    ELSEIF p_pin_value IS NOT NULL AND UNHEX(SHA2(p_pin_value, 256)) = v_verifier THEN
        UPDATE accounts SET failed_pin_attempts = 0 WHERE account_id = v_account;
        COMMIT;
        SELECT 'OK' AS result, v_max AS attempts_left;
    ELSEIF v_failed + 1 >= v_max THEN
        UPDATE accounts SET failed_pin_attempts = v_failed + 1, locked_at = NOW(6) WHERE account_id = v_account;
        COMMIT;
        SELECT 'LOCKED' AS result, 0 AS attempts_left;
    ELSE
        UPDATE accounts SET failed_pin_attempts = v_failed + 1 WHERE account_id = v_account;
        COMMIT;
        SELECT 'WRONG_PIN' AS result, v_max - v_failed - 1 AS attempts_left;
    END IF;
END$$

-- Face templates of an active card holder who consented, for one embedding model (issue 7).
CREATE PROCEDURE face_template(IN p_pan_hmac BINARY(32), IN p_model_id VARCHAR(64))
    READS SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: enrolled face templates (consented, active accounts only)'
BEGIN
    IF (SELECT atm_id FROM atms WHERE db_user = SUBSTRING_INDEX(USER(), '@', 1)) IS NULL THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-DENIED: this login is not registered as an ATM';
    END IF;
    SELECT f.template_id, f.template
      FROM face_templates AS f
      JOIN accounts AS a ON a.account_id = f.account_id
     WHERE a.pan_hmac = p_pan_hmac AND a.status = 'active'
       AND f.model_id = p_model_id AND f.consent
     ORDER BY f.template_id;
END$$

-- Idempotent insert of one journal event of the calling ATM: the same uuid with the same hash
-- is accepted silently; with another hash it is a conflict. The hash covers every field, and
-- the client checks it against the record before sending.
CREATE PROCEDURE ingest_event(
    IN p_atm_id VARCHAR(64), IN p_uuid CHAR(36), IN p_seq BIGINT UNSIGNED, IN p_kind VARCHAR(64),
    IN p_t_wall VARCHAR(32), IN p_session_id VARCHAR(64), IN p_payload LONGTEXT,
    IN p_prev_hash CHAR(64), IN p_hash CHAR(64))
    MODIFIES SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: store one event of the calling ATM (idempotent on uuid)'
BEGIN
    DECLARE v_caller VARCHAR(64);
    DECLARE v_existing CHAR(64);

    SET v_caller = (SELECT atm_id FROM atms WHERE db_user = SUBSTRING_INDEX(USER(), '@', 1));
    IF v_caller IS NULL OR p_atm_id IS NULL OR p_atm_id <> v_caller THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-DENIED: atm_id does not match this login';
    END IF;
    SET v_existing = (SELECT hash FROM events WHERE uuid = p_uuid);
    IF v_existing IS NOT NULL THEN
        IF v_existing <> p_hash THEN
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-CONFLICT: an event with this uuid has different content';
        END IF;
    ELSE
        IF EXISTS (SELECT 1 FROM events WHERE atm_id = v_caller AND seq = p_seq) THEN
            SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-REJECT: this seq already holds another event';
        END IF;
        INSERT INTO events (atm_id, uuid, seq, kind, t_wall, session_id, payload, prev_hash, hash)
        VALUES (v_caller, p_uuid, p_seq, p_kind, p_t_wall, p_session_id, p_payload, p_prev_hash, p_hash);
        -- hash first: MySQL assigns left to right, so it must read the old chain_head_seq.
        UPDATE atms
           SET chain_head_hash = IF(p_seq > chain_head_seq, p_hash, chain_head_hash),
               chain_head_seq = GREATEST(chain_head_seq, p_seq),
               last_seen = NOW(6)
         WHERE atm_id = v_caller;
    END IF;
END$$

-- Idempotent insert of one sealed snapshot of the calling ATM; same uuid with different
-- metadata or sha256 is a conflict (the client checks sha256 against the blobs first).
CREATE PROCEDURE ingest_snapshot(
    IN p_atm_id VARCHAR(64), IN p_uuid CHAR(36), IN p_event_uuid CHAR(36), IN p_session_id VARCHAR(64),
    IN p_reason VARCHAR(64), IN p_is_fraud_evidence BOOLEAN, IN p_t_wall VARCHAR(32),
    IN p_sealed_frame LONGBLOB, IN p_sealed_crop LONGBLOB, IN p_sha256 CHAR(64))
    MODIFIES SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: store one sealed snapshot of the calling ATM (idempotent on uuid)'
BEGIN
    DECLARE v_caller VARCHAR(64);
    DECLARE v_same INT;

    SET v_caller = (SELECT atm_id FROM atms WHERE db_user = SUBSTRING_INDEX(USER(), '@', 1));
    IF v_caller IS NULL OR p_atm_id IS NULL OR p_atm_id <> v_caller THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-DENIED: atm_id does not match this login';
    END IF;
    SET v_same = (SELECT atm_id = v_caller AND sha256 = p_sha256 AND event_uuid = p_event_uuid
                         AND session_id <=> p_session_id AND reason = p_reason
                         AND is_fraud_evidence = p_is_fraud_evidence AND t_wall = p_t_wall
                    FROM snapshots WHERE uuid = p_uuid);
    IF v_same IS NULL THEN
        INSERT INTO snapshots (uuid, atm_id, event_uuid, session_id, reason, is_fraud_evidence, t_wall,
                               sealed_frame, sealed_crop, sha256)
        VALUES (p_uuid, v_caller, p_event_uuid, p_session_id, p_reason, p_is_fraud_evidence, p_t_wall,
                p_sealed_frame, p_sealed_crop, p_sha256);
    ELSEIF v_same = 0 THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-CONFLICT: a snapshot with this uuid has different content';
    END IF;
END$$

-- What the server holds of the calling ATM's chain: one row (atm_id, seq, hash).
CREATE PROCEDURE atm_chain_head()
    READS SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: the highest seq stored for the calling ATM and its hash'
BEGIN
    DECLARE v_caller VARCHAR(64);
    SET v_caller = (SELECT atm_id FROM atms WHERE db_user = SUBSTRING_INDEX(USER(), '@', 1));
    IF v_caller IS NULL THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'ATMGUARD-DENIED: this login is not registered as an ATM';
    END IF;
    SELECT atm_id, chain_head_seq, chain_head_hash FROM atms WHERE atm_id = v_caller;
END$$

DELIMITER ;
