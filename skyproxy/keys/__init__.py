"""Keys: the `Secret` wrapper, key sources, the keyring, key ages and rotation."""
