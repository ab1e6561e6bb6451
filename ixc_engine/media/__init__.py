"""Media preprocessing: images (HD crops) and videos (frame canvas)."""
