"""Optional extras shipped with edge-agent (e.g. example registered functions)."""
