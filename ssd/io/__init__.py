"""Input and output: image loading and HTTP downloads under one policy."""
