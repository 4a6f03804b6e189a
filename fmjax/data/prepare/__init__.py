"""Data preparation: raw sources to a versioned, filtered, deduplicated data pile (Apache Beam)."""
