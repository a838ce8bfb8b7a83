"""The export pipeline: catalog -> query -> source -> encoders -> stream.

It knows nothing of HTTP or the CLI.
"""
