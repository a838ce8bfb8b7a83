"""The routes: datasets and their exports, jobs, the export log."""
