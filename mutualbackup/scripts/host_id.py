# borg's own host id, printed as borg computes it (borg/platform/base.py): its patched getfqdn (the
# canonical name of gethostname(), not socket.getfqdn()) and uuid.getnode(). Run by lock_listing.sh.
import socket, uuid
name = socket.gethostname()
try:
    addrs = socket.getaddrinfo(name, None, 0, socket.SOCK_DGRAM, 0, socket.AI_CANONNAME)
except OSError:
    addrs = []
name = next((a[3] for a in addrs if a[3]), name)
print('%s@%d' % (name, uuid.getnode()))
