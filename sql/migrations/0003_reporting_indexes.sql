-- 0003: indexes for the bank's reports (events by kind over time, fraud evidence by arrival).
--
-- The guarded-ALTER pattern every later ALTER follows: MySQL 8 has no ADD COLUMN/INDEX IF NOT
-- EXISTS (MariaDB has), so the statement is chosen from information_schema and run as a
-- prepared statement; 'DO 0' when there is nothing to do. Portable, and safe to run again.

SET @ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'events' AND index_name = 'ix_events_kind_time') = 0,
    'ALTER TABLE events ADD INDEX ix_events_kind_time (kind, t_wall)',
    'DO 0');
PREPARE guarded_ddl FROM @ddl;
EXECUTE guarded_ddl;
DEALLOCATE PREPARE guarded_ddl;

SET @ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'snapshots' AND index_name = 'ix_snapshots_fraud') = 0,
    'ALTER TABLE snapshots ADD INDEX ix_snapshots_fraud (is_fraud_evidence, received_at)',
    'DO 0');
PREPARE guarded_ddl FROM @ddl;
EXECUTE guarded_ddl;
DEALLOCATE PREPARE guarded_ddl;
