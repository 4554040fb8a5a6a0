"""Turning a finished run into report.json / report.md and terminal text."""
