"""`python -m ddpm_fast.prepare`: runs ddpm_fast/commands/prepare.py (the command lives there)."""
from .commands.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
