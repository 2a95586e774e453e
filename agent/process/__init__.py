"""Processes on the host: /proc maps and file identity, process selectors, reading process memory."""
