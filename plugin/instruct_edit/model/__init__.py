"""Observable plugin state and the logic that runs edits (no widgets, no direct Krita calls)."""
