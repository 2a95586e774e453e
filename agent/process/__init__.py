"""Processes on the host: the one /proc watcher (started and exited processes), the keys of a
process instance and of a file's content (ProcessKey, FileKey), /proc maps, process selectors,
reading process memory."""
