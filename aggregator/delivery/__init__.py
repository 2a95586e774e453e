"""How profile messages reach the merge and leave the stream exactly once.

``consumers`` pulls from JetStream (or subscribes on core NATS) and skips redeliveries already
handled; ``intake`` validates and decodes messages against each stream's dictionary, parking
samples whose dictionary is late; ``ack_ledger`` holds the merged messages until their export
is written; ``exported_messages`` and ``peer_markers`` record which messages each export holds,
for this replica and across replicas; ``export_then_ack`` runs each interval in the order all
of this depends on: export, mark, ack. Design: docs/design/durability.md.
"""
