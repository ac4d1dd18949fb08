"""Exact distributed evaluation: scoring, metrics and their uncertainty."""
