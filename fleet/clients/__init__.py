"""Clients of the external systems, each behind a small protocol with a local default."""
