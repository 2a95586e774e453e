"""Go: pclntab symbols, build info, runtime layouts, goroutines, heap profiles and probes."""
