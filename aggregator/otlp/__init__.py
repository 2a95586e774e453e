"""OTLP profiles (v1.10): ``encode`` builds the export request from the fleet's profiles,
``decode`` reads requests back into that model, ``checks`` tests a request against the spec's
and consumers' rules. Design: docs/design/otlp.md."""
