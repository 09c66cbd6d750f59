"""desam: plans stage."""
