"""`python -m host` is the same as `strategy-host`."""
from .cli import main

raise SystemExit(main())
