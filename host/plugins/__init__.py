"""Plugins: loader (unique module names), validation (scratch manager), dispatch (isolated calls),
registry (live versions, atomic swap) and reloader (watchdog + debounce + content hash)."""
