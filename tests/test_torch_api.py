"""The GPU machine runs torch 2.11 while CI runs a newer wheel, so an API added after 2.11 would pass
CI and break the one GPU call a session gets. Every torch name the code that runs there uses
(ddpm_fast, kernels, benchmarks, tests: import and attribute chains, read from the source's AST) must
be in docs/torch_api.txt, the list of names checked to exist in torch 2.11 (docs/DESIGN.md, "torch
2.11"); a new one fails here until it is checked and added, and a name no longer used must leave."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTED = ROOT / "docs" / "torch_api.txt"
OWN_OPS = "torch.ops.ddpm_fast"  # the project's own ops, registered by its extension and ops/


def torch_names(source: str) -> set[str]:
    """Fully qualified torch names a module uses: what it imports and every attribute chain read
    from an imported torch name (`import torch.nn.functional as F; F.silu` gives
    torch.nn.functional.silu)."""
    tree = ast.parse(source)
    alias: dict[str, str] = {}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    names.add(a.name)
                    alias[a.asname or "torch"] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "torch":
            for a in node.names:
                names.add(f"{node.module}.{a.name}")
                alias[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        chain, n = [], node
        while isinstance(n, ast.Attribute):
            chain.append(n.attr)
            n = n.value
        if chain and isinstance(n, ast.Name) and n.id in alias:
            names.add(".".join([alias[n.id], *reversed(chain)]))
    return {n for n in names if not n.startswith(OWN_OPS)}


def used() -> dict[str, str]:
    """name -> the first file that uses it."""
    out: dict[str, str] = {}
    for folder in ("ddpm_fast", "kernels", "benchmarks", "tests"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            if ".venv" in f.parts or "kernels" in f.relative_to(ROOT).parts[1:]:
                continue  # ddpm_fast/kernels may be a link to kernels/, read once
            for n in torch_names(f.read_text()):
                out.setdefault(n, str(f.relative_to(ROOT)))
    return out


def listed() -> set[str]:
    return {ln.strip() for ln in LISTED.read_text().splitlines() if ln.strip() and not ln.startswith("#")}


def test_every_torch_name_is_checked_against_2_11():
    new = {n: f for n, f in used().items() if n not in listed()}
    assert not new, ("torch names not yet checked against torch 2.11 (the GPU machine's): check each exists "
                     "there, then add it to docs/torch_api.txt: " +
                     ", ".join(f"{n} ({f})" for n, f in sorted(new.items())))


def test_the_list_holds_only_names_in_use():
    stale = listed() - set(used())
    assert not stale, f"docs/torch_api.txt lists names no longer used: {sorted(stale)}"


def test_the_reader_finds_aliases_and_from_imports():
    src = ("import torch\nimport torch.nn.functional as F\nfrom torch.library import custom_op as co\n"
           "torch.cuda.graph(g)\nF.silu(x)\nco('a')\nx.cuda()\ntorch.ops.ddpm_fast.sampling_update(x)\n")
    got = torch_names(src)
    assert {"torch.cuda.graph", "torch.nn.functional.silu", "torch.library.custom_op"} <= got
    assert not any(n.startswith(OWN_OPS) for n in got) and "cuda" not in got
