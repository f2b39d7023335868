"""Shared test helpers: generated speech and a real server process."""
