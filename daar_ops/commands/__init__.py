"""Subcommands of ``daar-ops``; each module defines ``register(subparsers)``."""
