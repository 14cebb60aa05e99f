"""Prefect flows: thin wrappers over seqvision, one per pipeline stage."""
