"""Semantic routing for `model: "auto"` (issue 17)."""
