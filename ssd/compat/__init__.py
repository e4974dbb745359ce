"""NVIDIA's notebook transforms, exact and fast: the engine behind the seed-compatible ``utils`` facade."""
