"""PostgreSQL shared by Warden's parts that choose it (``[database]``): schema migrations and their check."""
