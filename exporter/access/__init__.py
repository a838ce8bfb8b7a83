"""Who may export what: API keys, and the export log with its queries."""
