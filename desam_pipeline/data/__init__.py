"""Datasets and their derived data: raw datasets and checks, plans, splits, slice preprocessing, the
embedding cache, training samples and prompts."""
