"""desam: dataset_conversion stage."""
