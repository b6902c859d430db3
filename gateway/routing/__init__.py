"""Semantic routing: `model: "auto"` served by the caller's adapter whose routes match the prompt."""
