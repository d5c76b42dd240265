"""Screens of the wina TUI: setup, calibrate, chat, evaluate, help."""
