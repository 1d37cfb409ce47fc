"""The `m3d-lit` subcommands: argument parsing and orchestration, one module per command."""
