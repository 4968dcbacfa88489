-- Least-privilege grants of one ATM account. A template: {{database}}, {{atm_user}} and
-- {{atm_host}} are replaced by `atmguard db add-atm` (and by `db migrate` when it re-grants
-- every registered ATM), which first checks them against [A-Za-z0-9_.-%]; by hand:
--   sed -e 's/{{database}}/atmguard/g' -e 's/{{atm_user}}/atm_0001/g' -e 's/{{atm_host}}/%/g' atm.sql
-- The account must exist (CREATE USER) and be mapped in atms.db_user.
--
-- EXECUTE on these procedures is all an ATM gets: no SELECT, INSERT, UPDATE, DELETE or DROP
-- on any table. Events and snapshots are written only through ingest_*, which take the ATM's
-- identity from its login; accounts are reached only through procedures that never return a
-- PIN verifier. No roles: MySQL 8 and MariaDB differ in how default roles are set.

-- Start from nothing, so a privilege added by hand does not survive a re-grant.
REVOKE ALL PRIVILEGES, GRANT OPTION FROM '{{atm_user}}'@'{{atm_host}}';

GRANT EXECUTE ON PROCEDURE `{{database}}`.`hot_list_status` TO '{{atm_user}}'@'{{atm_host}}';
GRANT EXECUTE ON PROCEDURE `{{database}}`.`pin_salt` TO '{{atm_user}}'@'{{atm_host}}';
GRANT EXECUTE ON PROCEDURE `{{database}}`.`verify_pin` TO '{{atm_user}}'@'{{atm_host}}';
GRANT EXECUTE ON PROCEDURE `{{database}}`.`face_template` TO '{{atm_user}}'@'{{atm_host}}';
GRANT EXECUTE ON PROCEDURE `{{database}}`.`ingest_event` TO '{{atm_user}}'@'{{atm_host}}';
GRANT EXECUTE ON PROCEDURE `{{database}}`.`ingest_snapshot` TO '{{atm_user}}'@'{{atm_host}}';
GRANT EXECUTE ON PROCEDURE `{{database}}`.`atm_chain_head` TO '{{atm_user}}'@'{{atm_host}}';
GRANT EXECUTE ON PROCEDURE `{{database}}`.`schema_version` TO '{{atm_user}}'@'{{atm_host}}';
