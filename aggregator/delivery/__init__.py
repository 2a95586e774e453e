"""How NATS messages reach the merge and are acked exactly once: consumers, intake, ack ledger, export markers."""
