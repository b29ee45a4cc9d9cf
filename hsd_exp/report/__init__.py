"""Reporting: run folders read back, the comparison tables, the quality-vs-layers plot, W&B."""
