-- Indexes for searching the audit log by user, status and record kind, newest first (the console's
-- audit explorer and `warden audit search`): without them such a search reads the whole table.
-- On a large existing table, CREATE INDEX blocks writes while it builds; run `warden db migrate` in a quiet hour.

CREATE INDEX audit_records_subject_ts ON audit_records (subject, ts_us);
CREATE INDEX audit_records_status_ts ON audit_records (status, ts_us);
CREATE INDEX audit_records_kind_ts ON audit_records (kind, ts_us);
