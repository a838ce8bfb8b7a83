"""Where job files are kept: the store interface, a local directory, an S3-compatible bucket."""
