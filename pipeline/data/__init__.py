"""Input adapters and vocabularies."""
