"""`python -m ddpm_fast.evaluate`: runs ddpm_fast/commands/evaluate.py (the command lives there)."""
from .commands.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
