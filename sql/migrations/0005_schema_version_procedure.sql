-- 0005: schema_version(), so an ATM can tell which migration its central server is at.
--
-- An ATM account may not read schema_migrations (it gets EXECUTE on its procedures and nothing
-- else), yet `atmguard diag` must say whether the server's schema is the one this version of the
-- ATM code calls. This definer procedure returns one row: the newest migration applied. It reads
-- only that number, so it needs no check of who calls it; sql/grants/atm.sql grants it to ATMs.
-- Idempotent: DROP ... IF EXISTS then CREATE (`db migrate` re-grants every ATM afterwards).

DROP PROCEDURE IF EXISTS schema_version;

DELIMITER $$

CREATE PROCEDURE schema_version()
    READS SQL DATA
    SQL SECURITY DEFINER
    COMMENT 'ATM: the newest migration applied to this database'
BEGIN
    SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations;
END$$

DELIMITER ;
