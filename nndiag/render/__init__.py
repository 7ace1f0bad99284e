"""Rendering of result objects: rich text, JSON and matplotlib figures."""
