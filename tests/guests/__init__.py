"""vmmd test guests: sources, builder (build.py) and output checkers (checks.py)."""
