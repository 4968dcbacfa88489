-- 0004: at most one face template per account and embedding model, enforced by the server.
--
-- `atmguard enroll` already replaces an account's template under a row lock; the unique key makes
-- the rule hold for any other writer too, and the ATM's face_template() can then return one row.
-- Older duplicates (none are written by atmguard) are superseded rows: the newest one is kept,
-- as a re-enrolment would. Guarded like 0003, so the file can run again.

DELETE older
  FROM face_templates AS older
  JOIN face_templates AS newer
    ON newer.account_id = older.account_id
   AND newer.model_id = older.model_id
   AND newer.template_id > older.template_id;

SET @ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'face_templates'
        AND index_name = 'uq_face_templates_account_model') = 0,
    'ALTER TABLE face_templates ADD UNIQUE KEY uq_face_templates_account_model (account_id, model_id)',
    'DO 0');
PREPARE guarded_ddl FROM @ddl;
EXECUTE guarded_ddl;
DEALLOCATE PREPARE guarded_ddl;

-- The unique key covers what the old index did (its leading columns are the same).
SET @ddl = IF(
    (SELECT COUNT(*) FROM information_schema.statistics
      WHERE table_schema = DATABASE() AND table_name = 'face_templates'
        AND index_name = 'ix_face_templates_account') > 0,
    'ALTER TABLE face_templates DROP KEY ix_face_templates_account',
    'DO 0');
PREPARE guarded_ddl FROM @ddl;
EXECUTE guarded_ddl;
DEALLOCATE PREPARE guarded_ddl;
