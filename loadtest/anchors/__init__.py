"""Other serving stacks to measure ours against, started on this machine."""
