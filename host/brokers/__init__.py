"""Broker adapters: the protocol, the paper broker and (later) Shoonya."""
