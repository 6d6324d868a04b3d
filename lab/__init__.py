"""The laboratory: real sshd nodes on 127.0.0.1 for the demo, the tests and the benches.

Not part of the installed product (``pip install`` carries only ``mutualbackup/``).
"""
