"""OTLP profiles (v1.10): encoding the fleet's profiles, decoding requests back, checking them against the spec."""
