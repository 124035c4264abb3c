"""The commands: each module parses its flags and calls the library; nothing in the library
imports them. `python -m ddpm_fast.<name>` runs them through the one-line modules of the same
name one floor up, kept because users' scripts call those names."""
