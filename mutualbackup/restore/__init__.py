"""Getting data back: choosing a replica, extracting onto a node, the temporary key of a restore
onto another node, and the recovery file of ``keys export``."""
