"""Language runtimes whose frames and profiles the agent reads from process memory."""
