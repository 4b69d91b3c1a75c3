"""The embedded Skytells imitation: an offline upstream that follows the API reference."""
