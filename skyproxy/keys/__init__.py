"""Keys: the `Secret` wrapper, key sources, the keyring store, key ages, status and rotation."""
