"""The agent's side of BPF: the one C<->Python contract (record layouts, enums, counter slots)."""
