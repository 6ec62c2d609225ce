"""The host's own behaviour, written as ordinary plugins."""
