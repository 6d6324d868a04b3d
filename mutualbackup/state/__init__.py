"""The coordinator's memory: the SQLite history, and the queries that metrics and the ledger read."""
