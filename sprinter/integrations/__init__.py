"""Bridges to serving engines (imported only where used: the core never imports an engine)."""
