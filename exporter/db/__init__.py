"""Database access: connection pools, snapshots, advisory-lock export slots, LISTEN."""
