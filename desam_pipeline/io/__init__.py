"""On-disk conventions and safe writing: atomic files, NIfTI reading and writing, the results tree layout."""
