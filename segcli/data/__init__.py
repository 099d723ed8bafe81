"""Input discovery and image decoding."""
