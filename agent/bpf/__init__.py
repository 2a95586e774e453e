"""The agent's side of its BPF programs: record and map layouts shared with bpf/*.c."""
