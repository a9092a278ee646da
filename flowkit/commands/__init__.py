"""Command-line commands (see :mod:`flowkit.cli`)."""
