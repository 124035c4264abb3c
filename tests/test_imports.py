"""Imports run one way: the library below the commands, inference below training. Read from every
module's source (imports inside functions included, which an import at run time would only
reach on the path a test happens to take), and checked once more by importing in a fresh
interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = "ddpm_fast.commands"
# The one-line modules that keep `python -m ddpm_fast.<name>` working: the commands' old names,
# above the library like the commands themselves.
COMMAND_NAMES = {f"ddpm_fast.{n}" for n in ("train", "sample", "evaluate", "export", "prepare", "ablate")}
# What loads or uses a trained model without training one.
INFERENCE = ("ddpm_fast.sampling", "ddpm_fast.checkpoint", "ddpm_fast.interop", "ddpm_fast.evaluation",
             "ddpm_fast.metrics", "ddpm_fast.images", "ddpm_fast.commands.sample", "ddpm_fast.commands.evaluate",
             "ddpm_fast.commands.export", "benchmarks.nfe")


def module_files() -> dict[str, Path]:
    files = {}
    for top in ("ddpm_fast", "benchmarks"):
        for f in (ROOT / top).rglob("*.py"):
            if "kernels" in f.relative_to(ROOT).parts[1:2] or f.name.startswith("test_") or f.name == "conftest.py":
                continue  # kernels/ is a symlink to the top-level Triton folder; tests are no library
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = f
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (a submodule imports its packages too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found - {name}


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g.get(m, ())
    return seen


def test_the_graph_is_read():
    """The checks below would pass vacuously on a graph that lost its edges."""
    g = graph()
    assert "ddpm_fast.checkpoint" in g["ddpm_fast.commands.sample"]  # a relative import two floors up
    assert "ddpm_fast.training.loop" in g["ddpm_fast.commands.train"]  # an import inside a function
    assert "ddpm_fast.commands.train" in g["ddpm_fast.train"]
    assert "ddpm_fast.training" in reachable(g, "ddpm_fast.commands.ablate")


def test_no_library_module_imports_the_commands():
    g = graph()
    library = [m for m in g if not (m == COMMANDS or m.startswith(COMMANDS + ".") or m in COMMAND_NAMES
                                    or m.startswith("benchmarks"))]
    assert len(library) > 20
    offenders = {m: sorted(t for t in g[m] if t == COMMANDS or t.startswith(COMMANDS + ".") or t in COMMAND_NAMES)
                 for m in library}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_inference_never_imports_training():
    g = graph()
    for start in INFERENCE:
        assert start in g, start
        training = sorted(m for m in reachable(g, start) if m.startswith("ddpm_fast.training"))
        assert training == [], f"{start} reaches {training}"


def test_fast_sampler_runs_without_loading_training():
    """At run time too: a fresh interpreter that samples with FastSampler has no training module
    (nor a command) in sys.modules."""
    code = ("import sys, torch, ddpm_fast\n"
            "m = ddpm_fast.UNet.from_preset('tiny', image_size=8, ch_mult=(1, 2), attn_res=())\n"
            "x = ddpm_fast.FastSampler(m, ddpm_fast.GaussianDiffusion('linear', 10), steps=2).sample(1, 8)\n"
            "assert x.shape == (1, 3, 8, 8)\n"
            "print(sorted(n for n in sys.modules if n.startswith(('ddpm_fast.training', 'ddpm_fast.commands'))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
