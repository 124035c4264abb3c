import numpy as np

from ddpm_fast.training.logging import plot_losses, smooth, smooth_log


def falling_loss(n=1000, seed=0):
    """A loss shaped like a training run's: it falls from 1 toward a floor of 0.02 (nearly two
    decades, most of it in the first 10% of the steps), with multiplicative noise."""
    trend = 0.02 + np.exp(-np.arange(n) / 40)
    return trend, trend * np.exp(np.random.default_rng(seed).normal(0, 0.25, n))


def test_smoothed_curve_tracks_the_raw_one_on_a_log_axis():
    trend, raw = falling_loss()
    err = np.abs(np.log(smooth_log(raw)) - np.log(trend))
    assert err.max() < 0.2 and np.median(err) < 0.05  # within 20% of the trend everywhere, the ends included
    # the linear trailing average it replaced lags far above the fall (by a factor over 1.5)
    assert np.abs(np.log(smooth(list(raw))) - np.log(trend)).max() > 0.4


def test_smooth_log_keeps_a_constant_and_a_short_series():
    assert np.allclose(smooth_log([0.5] * 7), 0.5)
    assert smooth_log([2.0]) == [2.0] and smooth_log([]) == []


def test_loss_plot_is_written(tmp_path):
    _, raw = falling_loss(50)
    rows = "step,loss\n" + "".join(f"{i},{v}\n" for i, v in enumerate(raw))
    (tmp_path / "metrics.csv").write_text(rows)
    plot_losses(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_loss_axis_is_labelled_with_the_run_s_loss(tmp_path, monkeypatch):
    """The axis names the loss it plots (it said "eps MSE" whatever the run's target and weight)."""
    from matplotlib.axes import Axes

    labels = []
    real = Axes.set_ylabel
    monkeypatch.setattr(Axes, "set_ylabel",
                        lambda self, label, *a, **k: (labels.append(label), real(self, label, *a, **k))[1])
    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.25\n")
    plot_losses(tmp_path / "metrics.csv", tmp_path / "loss.png", "min-SNR-5 weighted eps MSE")
    assert labels == ["min-SNR-5 weighted eps MSE"]
