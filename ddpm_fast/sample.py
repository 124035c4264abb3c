"""`python -m ddpm_fast.sample`: runs ddpm_fast/commands/sample.py (the command lives there)."""
from .commands.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
