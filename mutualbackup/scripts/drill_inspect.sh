#!/bin/sh
# A drill's inspection: $1 is the scratch directory borg extracted into, the other arguments the archive
# paths P. For each, the extracted copy ($1/P) then the live file (/P): six NUL-terminated fields each:
# type, octal mode, size, mtime, link target, sha256 (all empty after "-" when the file does not exist).
scratch=$1; shift
for p do
  for f in "$scratch/$p" "/$p"; do
    if [ -L "$f" ] || [ -e "$f" ]; then
      find "$f" -maxdepth 0 -printf '%y\0%m\0%s\0%T@\0%l\0'
      if [ -f "$f" ] && [ ! -L "$f" ] && h=$(sha256sum < "$f"); then printf '%.64s\0' "$h"; else printf '\0'; fi
    else
      printf -- '-\0\0\0\0\0\0'
    fi
  done
done
