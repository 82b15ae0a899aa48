"""Subcommands of the ``vqbet`` command (see ``vqbet_core.cli.main``)."""
