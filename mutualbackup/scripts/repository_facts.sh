#!/bin/sh
# Size and last write of each segment of the borg repository at $1 (run on the host, no key needed):
# one line "MTIME SIZE" per segment file. Exit 3: no such directory; 4: not a borg repository.
cd -- "$1" 2>/dev/null || exit 3
[ -f config ] && [ -d data ] || exit 4
exec find data -type f -printf '%T@ %s\n'
