"""Foundations every layer may use: errors, tree roots, devices and precision, settings flags, processes,
metrics."""
