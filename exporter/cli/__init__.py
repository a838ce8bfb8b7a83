"""The `exporter` command: serve, migrate, keys, track, log, export, demo."""
