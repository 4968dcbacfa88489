"""Evidence storage: the local journal (written first), sealed snapshots, the central server, sync."""
