"""The kind of CPU a kernel measurement is keyed by, and `auto` on a kind never measured."""
import platform

import pytest
import torch

from ddpm_fast import ops
from ddpm_fast.ops import auto, reference
from ddpm_fast.ops.cpu_class import cpu_class, is_cpu_class, native_bf16

BLOCK = "processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: {name}\nflags\t\t: {flags}\n"


def cpuinfo(tmp_path, vendor, flags, name="a CPU"):
    p = tmp_path / f"{vendor}-{flags.replace(' ', '_')}"
    p.write_text("\n".join(BLOCK.format(n=n, vendor=vendor, name=name, flags=flags) for n in (0, 1)))
    return p


@pytest.mark.parametrize("vendor, flags, kind", [
    ("GenuineIntel", "fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16", "cpu-intel-amx_bf16"),
    ("AuthenticAMD", "fpu avx2 avx512f avx512_bf16", "cpu-amd-avx512_bf16"),
    ("GenuineIntel", "fpu avx2 avx512f", "cpu-intel-avx512f"),
    ("AuthenticAMD", "fpu avx avx2 fma", "cpu-amd-avx2"),
    ("HygonGenuine", "fpu sse2", "cpu-hygongenuine-base"),
])
def test_cpu_class_is_the_vendor_and_the_widest_feature(tmp_path, vendor, flags, kind):
    assert cpu_class(cpuinfo(tmp_path, vendor, flags)) == kind
    assert is_cpu_class(kind)
    # bf16 in hardware: AMX tiles or AVX-512 BF16; AVX-512F alone and AVX2 emulate it
    assert native_bf16(cpuinfo(tmp_path, vendor, flags)) == kind.endswith(("amx_bf16", "avx512_bf16"))


def test_cpu_class_without_cpuinfo_names_the_machine(tmp_path):
    kind = cpu_class(tmp_path / "absent")
    assert kind == f"cpu-{platform.machine().lower() or 'unknown'}" and is_cpu_class(kind)
    assert not is_cpu_class("H100") and is_cpu_class("cpu")  # "cpu": a module JSON's, naming no kind


def test_this_cpu_reads_its_own_entries_only(monkeypatch):
    """An entry measured on another kind of CPU is not this one's: auto runs the reference."""
    x = torch.randn(4, 32, 8, 8, dtype=torch.bfloat16)
    entry = {"op": "group_norm_act", "device_class": "", "dtype": "bfloat16", "shape": "C32xHW64", "backend": "aten",
             "speedup": 2.0}
    mine, other = auto.device_class(x.device), "cpu-elsewhere-avx2"
    assert mine.startswith("cpu-") and mine != other
    for cls, picked in ((mine, "aten"), (other, "torch")):
        table = {"entries": [{**entry, "device_class": cls}]}
        assert auto.lookup("group_norm_act", x, table) == picked
        assert auto.picked_anywhere("group_norm_act", "aten", x.device, table) == (picked == "aten")
        # and a call through the op dispatches to it
        monkeypatch.setattr(auto, "load_table", lambda: table)
        monkeypatch.setattr(auto, "_CHOICES", {})
        seen = []
        monkeypatch.setattr(ops, "_backend_module", lambda name: seen.append(name) or reference)
        ops.group_norm_act(x, 8, torch.ones(32), torch.zeros(32))
        assert seen == [picked]


def test_the_plan_says_whose_measurements_auto_reads(monkeypatch):
    from ddpm_fast.plan import ExecutionPlan
    cpu = torch.device("cpu")
    mine = auto.device_class(cpu)
    monkeypatch.setattr(auto, "load_table", lambda: {"devices": {mine: {}}, "entries": []})
    assert f"(auto: {mine}'s measurements)" in ExecutionPlan.resolve("cpu", fast=True).describe()
    monkeypatch.setattr(auto, "load_table", lambda: {"devices": {"cpu-elsewhere-avx2": {}}, "entries": []})
    assert f"(auto: {mine} not measured, the reference kernels)" in ExecutionPlan.resolve("cpu", fast=True).describe()
    assert "auto:" not in ExecutionPlan.resolve("cpu", kernels="torch").describe()  # no op left to auto
