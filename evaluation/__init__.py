"""desam: evaluation stage."""
