"""Noren OMS simulator: one matching engine, served in-process (paper) or over the wire."""
