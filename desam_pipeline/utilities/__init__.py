"""Foundations every layer may use: errors, tree roots, devices and precision, processes, metrics."""
