"""Processes on the host: /proc maps, selectors, reading process memory, scanning /proc."""
