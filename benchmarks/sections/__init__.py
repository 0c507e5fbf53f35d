"""One module per benchmark section; each has `run(args) -> dict`, its part of the results JSON."""
