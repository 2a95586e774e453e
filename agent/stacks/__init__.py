"""Raw BPF stack events to frames: assembly and the stack-scan recovery of skipped frames."""
