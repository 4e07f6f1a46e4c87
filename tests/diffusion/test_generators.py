"""as_generators: the one seed -> per-sample generators rule shared by diffusion.sample, prior_sample, the sde
samplers / likelihood and the pipelines."""
import pytest
import torch

import sde
from diffusion import VPLinear, prior_sample, sample
from diffusion.samplers import as_generators, generators_from_seeds


def _draws(gens):
    return [torch.randn(3, generator=g) for g in gens]


def test_seed_forms():
    for got, seeds in [(as_generators(5, 3), [5, 6, 7]), (as_generators([9, 2], 2), [9, 2]),
                       (as_generators((4,), 1), [4])]:
        assert [g.initial_seed() for g in got] == seeds
    g = torch.Generator()
    assert as_generators(g, 4) is g and as_generators(None, 4) is None
    gens = [torch.Generator(), torch.Generator()]
    assert as_generators(gens, 2) is gens
    assert as_generators(True, 2) is True  # a bool is not a seed (left for the sampler's own check)
    for a, b in zip(_draws(as_generators(3, 2)), _draws(generators_from_seeds(3, 2))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["prior", "diffusion.sample", "sde", "sde.dequantize"])
def test_int_seed_equals_explicit_generators_everywhere(where):
    """An int seed s in every entry point is generators s, s+1, ...: sample i depends on its seed only."""
    schedule = VPLinear()
    model = lambda x, t: (0.5 * x, 0.5 * x)  # noqa: E731  (x0, eps), any deterministic model
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))

    def run(generator):
        if where == "sde.dequantize":
            return sde.dequantize(torch.zeros(3, 2), generator)
        if where == "prior":
            return prior_sample((3, 2), schedule, generator)
        if where == "diffusion.sample":
            return sample(model, x_T, schedule, sampler="ddpm", steps=3, generator=generator)
        return sde.sample(model, x_T, schedule, sampler="pc", steps=3, generator=generator)

    torch.testing.assert_close(run(11), run(generators_from_seeds(11, 3)), rtol=0, atol=0)
    torch.testing.assert_close(run([11, 12, 13]), run(11), rtol=0, atol=0)
    assert not torch.equal(run(11), run(12))
