"""The loaders: batch shapes, equality across backends, seeded order, resume, rank shards."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import build_loader, load_images
from ddpm_fast.data.embedded import embedded_images
from ddpm_fast.data.order import epoch_plan

S = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """70 images of mixed sizes, aspect ratios and formats, in nested folders."""
    root = tmp_path_factory.mktemp("imgs")
    pics = embedded_images(70, 40, seed=3).numpy()
    for i, a in enumerate(pics):
        sub = root / ("a" if i % 2 else "b") / ("c" if i % 5 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(a)
        if i % 3 == 0:
            img = img.crop((0, 0, 40, 27))  # landscape, odd margin after resize
        elif i % 3 == 1:
            img = img.crop((0, 0, 23, 40))  # portrait
        if i % 4 == 0:
            img.save(sub / f"{i:03d}.png")
        else:
            img.save(sub / f"{i:03d}.jpg", quality=95)
    return root


def _all(loader):
    return torch.cat(list(loader))


def test_unknown_backend_names_the_flag(folder):
    with pytest.raises(ValueError, match="--loader"):
        build_loader(folder, S, 4, backend="fast")


@pytest.mark.parametrize("backend", ["torch", "cache"])
@pytest.mark.parametrize("channels", [3, 1])
def test_batches_come_in_the_memory_format_asked(folder, backend, channels):
    # The layout is the trainer's plan's decision, handed down; the loader only applies it.
    fmt = {"plain": torch.contiguous_format, "channels_last": torch.channels_last}
    got = {name: next(iter(build_loader(folder, S, 4, backend=backend, seed=2, num_workers=0, channels=channels,
                                        memory_format=f))) for name, f in fmt.items()}
    assert got["plain"].is_contiguous()
    assert got["channels_last"].is_contiguous(memory_format=torch.channels_last)
    if channels == 3:  # one channel has both layouts at once
        assert not got["channels_last"].is_contiguous() and not got["plain"].is_contiguous(
            memory_format=torch.channels_last)
    torch.testing.assert_close(got["plain"], got["channels_last"], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "cache"])
def test_batches_match_reference_with_flips(folder, backend):
    loader = build_loader(folder, S, 8, backend=backend, seed=5, num_workers=0)
    assert loader.backend == backend
    ref = load_images(folder, S, split="train")
    assert loader.num_images == ref.shape[0] == 63  # 90% of 70
    assert len(loader) == 63 // 8
    loader.set_epoch(2)
    got = list(loader)
    assert len(got) == 7 and all(b.shape == (8, 3, S, S) and b.dtype == torch.float32
                                 for b in got)
    plan = loader.plan(2)
    expected = ref[torch.from_numpy(plan.indices)]
    flips = torch.from_numpy(plan.flips)
    assert 0 < flips.sum() < len(flips)
    expected = torch.where(flips.view(-1, 1, 1, 1), expected.flip(3), expected)
    torch.testing.assert_close(torch.cat(got), expected, atol=1e-6, rtol=0)
    assert torch.cat(got).min() >= -1 and torch.cat(got).max() <= 1


def test_eval_split_is_ordered_unflipped_and_complete(folder):
    for backend in ("torch", "cache"):
        loader = build_loader(folder, S, 2, split="test", backend=backend, drop_last=False,
                              num_workers=0)
        assert loader.num_images == 4 and len(loader) == 2
        torch.testing.assert_close(_all(loader), load_images(folder, S, split="test"))


def test_seeded_order_and_exact_resume(folder):
    a = build_loader(folder, S, 4, backend="cache", seed=1)
    b = build_loader(folder, S, 4, backend="cache", seed=1)
    first, again = list(a), list(b)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    second = list(a)  # a full iteration moves on to the next epoch
    assert not torch.equal(torch.cat(first), torch.cat(second))
    other_seed = build_loader(folder, S, 4, backend="cache", seed=2)
    assert not torch.equal(torch.cat(list(other_seed)), torch.cat(first))
    for backend in ("cache", "torch"):
        c = build_loader(folder, S, 4, backend=backend, seed=1, num_workers=0)
        c.set_epoch(1, start_batch=5)
        resumed = list(c)
        assert len(resumed) == len(second) - 5
        assert all(torch.equal(x, y) for x, y in zip(resumed, second[5:]))
    with pytest.raises(ValueError, match="start_batch"):
        c.set_epoch(0, start_batch=len(c) + 1)


def test_rank_shards_disjoint_cover_and_in_step():
    n, ws = 103, 3
    for epoch in range(2):
        plans = [epoch_plan(n, 4, seed=0, epoch=epoch, rank=r, world_size=ws, shuffle=True,
                            flip=True, drop_last=False) for r in range(ws)]
        seen = np.concatenate([p.indices for p in plans])
        assert len(seen) == n and set(seen.tolist()) == set(range(n))
        dropped = [epoch_plan(n, 4, seed=0, epoch=epoch, rank=r, world_size=ws, shuffle=True,
                              flip=True, drop_last=True) for r in range(ws)]
        assert {len(p) for p in dropped} == {n // ws // 4}
        assert len(np.unique(np.concatenate([p.indices for p in dropped]))) == 3 * 8 * 4


def test_rank_loaders_split_the_data(folder):
    loaders = [build_loader(folder, S, 5, backend="cache", rank=r, world_size=2, seed=3)
               for r in range(2)]
    assert [len(x) for x in loaders] == [6, 6]  # 63 images -> 31 per rank -> 6 batches
    batches = [torch.cat(list(x)) for x in loaders]
    # no image appears on both ranks (compare unflipped-or-flipped content)
    keys = [{(b.sum().item(), b.flip(2).sum().item()) for b in x} for x in batches]
    assert not keys[0] & keys[1]
    with pytest.raises(ValueError, match="rank"):
        build_loader(folder, S, 5, backend="cache", rank=2, world_size=2)


def test_torch_backend_with_worker_processes_across_epochs(folder):
    loader = build_loader(folder, S, 16, backend="torch", num_workers=2, seed=4)
    ref = build_loader(folder, S, 16, backend="cache", seed=4)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ref.set_epoch(epoch)
        torch.testing.assert_close(_all(loader), _all(ref))
    # Stopping mid-epoch (a run interrupted) and resuming elsewhere discards what the
    # persistent workers had prefetched.
    for i, _ in enumerate(loader):
        if i == 1:
            break
    loader.set_epoch(5, start_batch=2)
    ref.set_epoch(5, start_batch=2)
    torch.testing.assert_close(_all(loader), _all(ref))


def test_auto_picks_cache_on_cpu_and_reports_build_time(folder):
    loader = build_loader(folder, 12, 4, backend="auto")
    assert loader.backend == "cache"
    assert loader.build_seconds >= 0.0


def test_embedded_default_in_memory():
    loader = build_loader(None, 16, 32, seed=0)
    assert loader.backend == "memory"
    assert loader.num_images == 3686 and len(loader) == 3686 // 32
    it = iter(loader)
    x = next(it)
    assert x.shape == (32, 3, 16, 16) and x.is_contiguous()
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.3
    loader.set_epoch(0, start_batch=1)
    assert torch.equal(next(iter(loader)), next(it))
    test = load_images(None, 16, split="test", limit=10)
    assert test.shape == (10, 3, 16, 16)
    val = build_loader(None, 16, 8, split="val", drop_last=False)
    assert val.num_images == 204 and len(val) == 26
    torch.testing.assert_close(_all(val), load_images(None, 16, split="val"))
