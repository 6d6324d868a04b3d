#!/bin/sh
# Who holds the lock of the borg repository at $1: first the host's borg host id ($BORG_HOST_ID, else
# computed by the Python program $2, as borg computes it), then one line per holder:
# "exclusive HOST.PID-THREAD" per lock.exclusive entry, "roster JSON" for lock.roster. Exit 3: no directory.
cd -- "$1" 2>/dev/null || exit 3
printf '%s\n' "${BORG_HOST_ID:-$(python3 -c "$2" 2>/dev/null)}"
for f in lock.exclusive/*; do [ -e "$f" ] && printf 'exclusive %s\n' "${f#lock.exclusive/}"; done
if [ -f lock.roster ]; then printf 'roster '; tr -d '\n' < lock.roster; echo; fi
exit 0
