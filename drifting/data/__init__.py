"""Data sources: toy 2-D target distributions and dataset loaders."""
