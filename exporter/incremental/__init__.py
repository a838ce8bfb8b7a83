"""Incremental pulls: pull tokens, planning a pull, change tracking."""
