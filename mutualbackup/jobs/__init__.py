"""What the coordinator does on nodes, each job recorded as runs in the history: provisioning
(``apply``), backups, maintenance (prune, check, guarded compaction), drills, clean-up after a crash."""
