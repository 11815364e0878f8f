"""Limits and safe retries: GCRA request/token budgets (memory or Redis) and Idempotency-Key."""
