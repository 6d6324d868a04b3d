"""What people see: ``status``, the ledger, and the Prometheus metrics with their text format and server."""
