"""Fixtures of the migration tests: a fresh schema of each test's own on the real PostgreSQL."""

from tests import pg_helpers

pg_admin = pg_helpers.pg_admin
pg_schema = pg_helpers.pg_schema
