"""Widgets of the wina TUI, one per file. None of them imports the App class."""
