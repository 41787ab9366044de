"""Shared utilities: configuration, data (SDSS download, mock survey, dataset), training wiring."""
