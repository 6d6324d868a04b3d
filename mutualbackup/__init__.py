"""mutualbackup: encrypted backups of a federation's servers onto each other's disks."""

__version__ = "0.1.0"
