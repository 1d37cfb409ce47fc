"""The `m3d-lit` subcommands, one module per command: argument parsing and orchestration.

The top layer: a command may import any part of m3d-lit, and nothing below imports a command
(`pyproject.toml`, `[tool.importlinter]`). `m3d_lit.cli` dispatches to each module's `main(argv)`.
"""

# the subcommands that LightningCLI runs (`commands/lightning_cli.py`)
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
