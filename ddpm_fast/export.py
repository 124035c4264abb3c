"""`python -m ddpm_fast.export`: runs ddpm_fast/commands/export.py (the command lives there)."""
from .commands.export import main

if __name__ == "__main__":
    raise SystemExit(main())
