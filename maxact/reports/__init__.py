"""Report rendering (HTML/Markdown with figures) from run files; see issue 5 (not built yet)."""
