"""The audit log: one tamper-evident record per exchange and per admin action."""
