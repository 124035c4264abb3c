"""Class-conditional training: labels from folders (nested folders, a class with one image, an
unreadable file), the stratified split, and the loader's labels following its images."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.data import build_loader
from ddpm_fast.data.build import load_labelled
from ddpm_fast.data.labels import folder_classes, stratified_split
from ddpm_fast.data.listing import validate_images


def write(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), colour, np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    """cats: 30 dark images (some nested two levels deep), dogs: 20 bright ones, owl: a single
    image, and an unreadable file in dogs."""
    root = tmp_path / "data"
    for i in range(30):
        write(root / "cats" / ("deep/er" if i % 3 == 0 else "") / f"c{i}.png", 20 + i)
    for i in range(20):
        write(root / "dogs" / f"d{i}.png", 200 + i)
    write(root / "owl" / "only.png", 120)
    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    return root


def test_labels_are_first_folder_level(folder):
    with pytest.warns(UserWarning, match="skipped 1"):
        listing = validate_images(folder)
    classes = folder_classes(folder, listing.files)
    assert classes.names == ("cats", "dogs", "owl")
    assert classes.counts() == {"cats": 30, "dogs": 20, "owl": 1}
    for f, y in zip(listing.files, classes.labels):
        assert f.relative_to(folder).parts[0] == classes.names[y]


def test_stratified_split_keeps_every_class_in_training(folder):
    keys = [f"k{i}" for i in range(51)]
    labels = (0,) * 30 + (1,) * 20 + (2,)
    parts = {s: stratified_split(keys, labels, s, seed=3) for s in ("train", "val", "test")}
    assert sorted(sum(parts.values(), [])) == list(range(51))  # disjoint and complete
    per_class = {s: np.bincount([labels[i] for i in idx], minlength=3).tolist() for s, idx in parts.items()}
    assert per_class["train"] == [27, 18, 1]  # floor(0.9 n), and the single owl trains
    assert per_class["val"][:2] == [1, 1] and per_class["test"][:2] == [2, 1]
    assert stratified_split(keys, labels, "train", seed=3) == parts["train"]  # seeded
    assert stratified_split(keys, labels, "train", seed=4) != parts["train"]


def test_loader_labels_follow_the_images(folder):
    with pytest.warns(UserWarning):
        loader = build_loader(folder, 8, 4, split="train", backend="torch", num_workers=0, class_cond=True, seed=1)
    assert loader.class_names == ("cats", "dogs", "owl")
    seen = 0
    for x, y in loader:
        # cats are dark, dogs bright, the owl in between: each image's label matches its pixels
        mean = x.mean((1, 2, 3))
        want = torch.where(mean < -0.5, 0, torch.where(mean > 0.3, 1, 2))
        assert torch.equal(y, want)
        seen += len(y)
    assert seen == len(loader) * 4
    images, labels, names = load_labelled(folder, 8, "test")
    assert names == ("cats", "dogs", "owl") and len(images) == len(labels) and 2 not in labels.tolist()


def test_loose_files_and_empty_class_folders_are_named(tmp_path):
    root = tmp_path / "d"
    write(root / "a" / "x.png", 10)
    write(root / "loose.png", 10)
    with pytest.raises(ValueError, match="loose.png lies directly in"):
        build_loader(root, 8, 1, class_cond=True)
    (root / "loose.png").unlink()
    (root / "b").mkdir()
    (root / "b" / "bad.png").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"class folder .*/b holds no readable image"):
        build_loader(root, 8, 1, class_cond=True)


def test_embedded_classes_and_resume_position():
    loader = build_loader(None, 8, 16, class_cond=True, seed=2)
    assert loader.class_names == ("face", "circle", "square", "triangle")
    batches = list(loader)
    loader.set_epoch(0, start_batch=5)
    x, y = next(iter(loader))
    torch.testing.assert_close(x, batches[5][0])
    assert torch.equal(y, batches[5][1])


class ToyConditional(torch.nn.Module):
    """A class-conditional eps model: a fixed function of (x, t) plus a per-class offset; the null
    class has its own. Records the batch sizes it is called with."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.0]).view(4, 1, 1, 1))
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        return 0.1 * x + 0.001 * t.float().view(-1, 1, 1, 1) + self.offset[y]


def test_guidance_formula_against_a_hand_computation():
    from ddpm_fast import FastSampler, GaussianDiffusion

    model, d = ToyConditional(), GaussianDiffusion("linear", 20)
    sampler = FastSampler(model, d, method="ddim", steps=4, cfg_scale=2.5, cuda_graph=False)
    x, t, y = torch.randn(5, 3, 4, 4), torch.full((5,), 7), torch.tensor([0, 1, 2, 2, 0])
    got = sampler._model_out(x, t, y)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(got, uncond + 2.5 * (cond - uncond))
    assert model.calls[0] == 10  # conditional and unconditional as one batch of 2n
    model.calls.clear()
    FastSampler(model, d, method="ddim", steps=4, cuda_graph=False).sample(5, 4, classes=1)
    assert set(model.calls) == {5}  # w = 1: no unconditional half


@pytest.mark.parametrize("method, kw", [("ddpm", {"steps": 5}), ("ddim", {"steps": 5}), ("dpmpp_2m", {"steps": 5}),
                                        ("dpmpp_3m", {"steps": 6}), ("dpmpp_2m_sde", {"steps": 5}),
                                        ("unipc", {"steps": 5}), ("euler", {"steps": 5}), ("heun", {"steps": 4})])
def test_every_sampler_guides(method, kw):
    """Guidance reaches every solver: the guided chain equals the chain of a model that returns the
    guided output itself, from the same noise."""
    from ddpm_fast import FastSampler, GaussianDiffusion

    d = GaussianDiffusion("linear", 30)
    model = ToyConditional()
    y = torch.tensor([0, 2, 1])
    guided_model = lambda x, t: (lambda c, u: u + 3.0 * (c - u))(model(x, t, y), model(x, t, torch.full_like(y, 3)))  # noqa: E731
    x_T = torch.randn(3, 3, 4, 4)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    got = FastSampler(model, d, method=method, cfg_scale=3.0, cuda_graph=False, **kw).sample(
        3, 4, x_T=x_T, classes=y, generator=g())
    want = FastSampler(guided_model, d, method=method, cuda_graph=False, **kw).sample(3, 4, x_T=x_T, generator=g())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_guidance_errors_are_clear():
    from ddpm_fast import FastSampler, GaussianDiffusion, UNet

    d = GaussianDiffusion("linear", 10)
    plain = UNet.from_preset("tiny", image_size=8, ch_mult=(1, 2), attn_res=())
    with pytest.raises(ValueError, match="unconditional"):
        FastSampler(plain, d, method="ddim", steps=2).sample(2, 8, classes=0)
    with pytest.raises(ValueError, match="cfg_scale needs the classes"):
        FastSampler(ToyConditional(), d, method="ddim", steps=2, cfg_scale=2.0).sample(2, 4)
    with pytest.raises(ValueError, match=r"class labels must be in 0\.\.2"):
        FastSampler(ToyConditional(), d, method="ddim", steps=2).sample(2, 4, classes=3)


def test_label_dropout_replaces_the_share_asked_for_with_the_null_class():
    """The train step hands the model its labels with a cond_drop share replaced by the null class."""
    from ddpm_fast import GaussianDiffusion
    from ddpm_fast.plan import ExecutionPlan
    from ddpm_fast.training.ema import EMA
    from ddpm_fast.training.step import TrainStep, make_lr_scheduler, make_optimizer

    model = ToyConditional()
    seen = []
    real = model.forward
    model.forward = lambda x, t, y: (seen.append(y.clone()), real(x, t, y))[1]
    plan = ExecutionPlan()
    opt = make_optimizer(model, 1e-3, plan)
    step = TrainStep(model, GaussianDiffusion("linear", 10), opt, make_lr_scheduler(opt, 1e-3, 0, "constant", 50),
                     EMA(model, 0.9), plan, 1.0, torch.Generator().manual_seed(0), cond_drop=0.25)
    y = torch.tensor([0, 1, 2, 1] * 250)
    for s in range(4):
        step(s, (torch.randn(1000, 3, 2, 2), y))
    got = torch.stack(seen)
    dropped = got == 3
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(got[~dropped], y.expand_as(got)[~dropped])  # the rest keep their own label
    assert not torch.equal(dropped[0], dropped[1])  # drawn afresh each step


def test_conditional_run_keeps_its_classes_through_checkpoint_resume_and_export(tmp_path, capsys):
    import importlib

    from ddpm_fast.checkpoint import load_checkpoint, load_model

    train_cli = importlib.import_module("ddpm_fast.commands.train")
    sample_cli = importlib.import_module("ddpm_fast.commands.sample")
    small = ["--class-cond", "--image-size", "8", "--ch-mult", "1,2", "--attn-res", "4", "--batch-size", "8",
             "--workers", "0", "--timesteps", "20", "--sample-n", "4", "--sample-steps", "3", "--out", str(tmp_path / "r")]
    assert train_cli.main(small + ["--steps", "2"]) == 0
    assert "classes (4, training images): face" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "r")
    assert tuple(ck["config"]["class_names"]) == ("face", "circle", "square", "triangle")
    assert ck["config"]["model"]["num_classes"] == 4 and ck["model"]["class_emb.weight"].shape[0] == 5
    assert train_cli.main(small + ["--steps", "3", "--resume"]) == 0
    model, _, cfg = load_model(tmp_path / "r")
    assert model.num_classes == 4 and tuple(cfg["class_names"]) == ("face", "circle", "square", "triangle")
    assert sample_cli.main(["--ckpt", str(tmp_path / "r"), "--class", "square", "--class", "face", "--n", "2",
                            "--cfg-scale", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (2 * 10 + 2, 2 * 10 + 2)  # a row per class
