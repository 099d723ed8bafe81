"""What predict reads: SOURCE arguments to input files, image decoding, JPEG headers, and the
geometry of how an image meets the model (canvas, short-side resize, windows)."""
