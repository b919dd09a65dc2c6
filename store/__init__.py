"""Placeholder package: built by the study-engine and TUI issues."""
