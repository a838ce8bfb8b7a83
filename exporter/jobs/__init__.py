"""Background export jobs: records, the runner, progress events, seekable gzip files."""
