"""Sending profiles: delta encoding and publishing to NATS, with memory or disk outboxes."""
