"""Scoring inpainted images: FID, hole-region metrics and diversity, the classical baseline row,
and the report table."""
