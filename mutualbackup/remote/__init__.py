"""The one seam for side effects on nodes: the :class:`~mutualbackup.remote.transport.Transport`,
its SSH implementation (host keys pinned), and the supervision of long remote commands."""
