"""Guidance combiners against their equations written out here, sample by sample."""

import pytest
import torch

from lightning_converge.guidance import APG, Guidance, cfg, guidance_interval
from lightning_converge.schedules import Linear


def predictions(*shape, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(*shape, generator=generator, dtype=torch.float64)
    uncond = cond + 0.5 * torch.randn(*shape, generator=generator, dtype=torch.float64)
    return cond.to(dtype), uncond.to(dtype)


def apg_one_sample(cond, diff, scale, eta, norm_threshold):
    """The APG update for one sample, on flat float64 vectors, given its (momentum-adjusted) diff."""
    c, d = cond.flatten().double(), diff.flatten().double()
    if norm_threshold > 0:
        d = d * min(1.0, norm_threshold / d.norm().item())
    parallel = (torch.dot(d, c) / torch.dot(c, c)) * c
    orthogonal = d - parallel
    return (c + (scale - 1) * (orthogonal + eta * parallel)).reshape(cond.shape)


def test_cfg_is_uncond_plus_scale_times_difference():
    cond, uncond = predictions(3, 4, 5)
    torch.testing.assert_close(cfg(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond))
    torch.testing.assert_close(cfg(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg(cond, uncond, 0.0), uncond)


def test_cfg_takes_one_scale_per_sample():
    cond, uncond = predictions(3, 2, 5)
    scales = torch.tensor([1.0, 2.0, 4.0])
    guided = cfg(cond, uncond, scales)
    for i, scale in enumerate(scales.tolist()):
        torch.testing.assert_close(guided[i], uncond[i] + scale * (cond[i] - uncond[i]))


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("norm_threshold", [0.0, 0.8])
def test_apg_matches_its_equations(eta, norm_threshold):
    cond, uncond = predictions(4, 3, 5, 2)
    guided = APG(eta=eta, norm_threshold=norm_threshold)(cond, uncond, 5.0)
    for i in range(4):
        expected = apg_one_sample(cond[i], cond[i] - uncond[i], 5.0, eta, norm_threshold)
        torch.testing.assert_close(guided[i], expected)


def test_apg_rescale_changes_only_samples_above_the_threshold():
    cond, uncond = predictions(2, 8)
    uncond[1] = cond[1] + 1e-3 * (uncond[1] - cond[1])  # ||diff|| far below 1
    threshold = 0.5
    assert (cond[0] - uncond[0]).norm() > threshold
    rescaled = APG(eta=1.0, norm_threshold=threshold)(cond, uncond, 3.0)
    plain = APG(eta=1.0)(cond, uncond, 3.0)
    torch.testing.assert_close(rescaled[1], plain[1])
    assert not torch.allclose(rescaled[0], plain[0])
    torch.testing.assert_close((rescaled[0] - cond[0]).norm(), torch.tensor(2.0 * threshold, dtype=torch.float64))


def test_apg_without_parallel_part_moves_orthogonally_to_cond():
    cond, uncond = predictions(3, 2, 6, 6)
    guided = APG(eta=0.0)(cond, uncond, 9.0)
    for i in range(3):
        assert torch.dot((guided[i] - cond[i]).flatten(), cond[i].flatten()).abs() < 1e-9


def test_apg_with_eta_one_is_cfg():
    cond, uncond = predictions(5, 3, 4, 4)
    torch.testing.assert_close(APG(eta=1.0)(cond, uncond, 6.0), cfg(cond, uncond, 6.0))
    scales = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(APG(eta=1.0)(cond, uncond, scales), cfg(cond, uncond, scales))


def test_apg_momentum_and_reset():
    momentum, steps = -0.5, 4
    apg = APG(eta=0.0, momentum=momentum)
    pairs = [predictions(2, 3, 4, seed=seed) for seed in range(steps)]

    running = torch.zeros(2, 3, 4, dtype=torch.float64)
    for cond, uncond in pairs:
        running = (cond - uncond) + momentum * running
        guided = apg(cond, uncond, 4.0)
        for i in range(2):
            torch.testing.assert_close(guided[i], apg_one_sample(cond[i], running[i], 4.0, 0.0, 0.0))

    # After reset the next step sees no history: the same as a fresh APG.
    apg.reset()
    cond, uncond = pairs[0]
    torch.testing.assert_close(apg(cond, uncond, 4.0), APG(eta=0.0, momentum=momentum)(cond, uncond, 4.0))
    with pytest.raises(ValueError, match="reset"):
        apg(*predictions(3, 3, 4), 4.0)  # a new batch size without reset()


@pytest.mark.parametrize("shape", [(7,), (2, 9), (3, 2, 5, 5), (2, 3, 2, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("combiner", [cfg, APG(eta=0.2, norm_threshold=1.0)], ids=["cfg", "apg"])
def test_any_shape_and_dtype_is_preserved(shape, dtype, combiner):
    cond, uncond = predictions(*shape, dtype=dtype)
    guided = combiner(cond, uncond, 3.0)
    assert guided.shape == cond.shape and guided.dtype == dtype
    exact = combiner(cond.double(), uncond.double(), 3.0)
    # The low-precision inputs are computed in fp32: only the final rounding differs.
    torch.testing.assert_close(guided.double(), exact, rtol=1e-2, atol=1e-2)


def test_apg_norm_threshold_zero_does_not_rescale():
    # As in the APG authors' code and diffusers: 0 means no rescaling, so with eta 1 and no
    # momentum APG is plain CFG however large the difference.
    cond, uncond = predictions(3, 4, 5)
    uncond = cond + 100.0 * (uncond - cond)
    torch.testing.assert_close(APG(eta=1.0, norm_threshold=0.0)(cond, uncond, 4.0), cfg(cond, uncond, 4.0))


def test_mismatched_shapes_raise():
    cond, uncond = predictions(2, 4)
    with pytest.raises(ValueError, match="same shape"):
        cfg(cond, uncond[:, :3], 2.0)
    with pytest.raises(ValueError, match="same shape"):
        APG()(cond, uncond[:1], 2.0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(eta=float("nan")), "eta"),
        (dict(norm_threshold=-1.0), "norm_threshold"),
        (dict(norm_threshold=float("inf")), "norm_threshold"),
        (dict(momentum=0.5), "momentum"),
    ],
)
def test_apg_bad_arguments_raise(kwargs, argument):
    with pytest.raises(ValueError, match=f"APG: {argument} must be"):
        APG(**kwargs)


def test_guidance_interval_guides_only_inside():
    cond, uncond = predictions(2, 3, 4)
    guide = guidance_interval(scale=4.0, sigma_lo=0.28, sigma_hi=5.42)
    for sigma in [80.0, 5.42, 0.1]:
        assert not guide.needs_uncond(sigma)
        assert guide(cond, None, sigma) is cond  # no unconditional pass needed
    for sigma in [5.0, 1.0, 0.28, torch.tensor(2.0)]:
        assert guide.needs_uncond(sigma)
        torch.testing.assert_close(guide(cond, uncond, sigma), uncond + 4.0 * (cond - uncond))
    with pytest.raises(ValueError, match="uncond is needed"):
        guide(cond, None, 1.0)


def test_guidance_scale_follows_a_schedule_over_sampler_steps():
    cond, uncond = predictions(2, 6)
    apg = APG(eta=0.5, momentum=-0.25)
    guide = Guidance(scale=Linear(start=1.0, end=5.0, steps=4), combiner=apg)
    reference = APG(eta=0.5, momentum=-0.25)
    for step in range(6):
        scale = 1.0 + min(step, 4)
        expected = cond if step == 0 else reference(cond, uncond, scale)
        torch.testing.assert_close(guide(cond, uncond, step), expected)
    guide.reset()
    assert apg.running_diff is None
