"""`python -m ddpm_fast.train`: runs ddpm_fast/commands/train.py (the command lives there)."""
from .commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
