"""``mutualbackup-node``: the program on every node, the only thing the coordinator's key can run.

``join`` (run once by the member's admin) installs the coordinator's forced-command line, pins
the node's own name and the member's admins, and makes the node's sealing key. ``serve`` (the
forced command) answers a fixed set of requests with structured arguments, validated here: borg
runs on the node, progress and results go back, and no shell, no file read and no secret ever.
See ARCHITECTURE.md, "The node program".
"""

DEFAULT_CONFIG = "/etc/mutualbackup-node"
CONFIG_FILE = "node.json"
ENVIRONMENT = "MUTUALBACKUP_NODE_CONFIG"  # another configuration directory (the lab's nodes share a machine)
