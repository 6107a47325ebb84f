"""The model catalog and the offline models (tiny, sd21-random)."""
