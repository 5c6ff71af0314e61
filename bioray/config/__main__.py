"""``python -m bioray.config > docs/config.md``: prints the config reference."""

from bioray.config.docs import reference_markdown

print(reference_markdown())
