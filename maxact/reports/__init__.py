"""Report rendering (HTML/Markdown with PNG figures) from run files: ``analyzer report``."""
