"""`python -m linattn.bench ...`: the same as `linattn bench ...` (the workers start this way)."""
from . import main

raise SystemExit(main())
