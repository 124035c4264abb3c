"""`python -m ddpm_fast.ablate`: runs ddpm_fast/commands/ablate.py (the command lives there)."""
from .commands.ablate import main

if __name__ == "__main__":
    raise SystemExit(main())
