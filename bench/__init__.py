"""The benchmark harness: `uv run python -m bench` (see bench/README.md)."""
