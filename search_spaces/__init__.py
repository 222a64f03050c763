"""Bundled search spaces (YAML); `stain-search spaces` lists them."""
