"""The agent's BPF side: loading programs, the C<->Python record layouts, reading records."""
