"""Client tokens: what an app presents instead of a key, stored only as SHA-256 hashes."""
