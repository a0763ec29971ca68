"""Run reports (markdown, JSON, terminal tables)."""
