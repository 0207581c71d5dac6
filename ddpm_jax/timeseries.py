"""Placeholder replaced by the time-series issue."""
