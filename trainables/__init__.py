"""Ray trainables: what one search trial runs (installed as stain_search.trainables)."""
