"""DDPM with learned variance: schedule, the variational term's optimum, distillation terms."""
import torch

from linattn.vision.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, distillation_terms


def test_schedule_and_forward_process():
    d = GaussianDiffusion(50)
    assert d.betas.max() <= 0.999 and d.acp[-1] < 1e-3 and (d.acp[1:] < d.acp[:-1]).all()
    x0, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    t = torch.tensor([0, 49])
    xt = d.q_sample(x0, t, noise)
    a = d.acp[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)


def test_variational_term_vanishes_at_the_true_posterior():
    """With the true noise and v = -1 (log-variance = the posterior's), the KL terms (t > 0)
    are 0 and MSE is 0; a wrong variance makes them positive."""
    d = GaussianDiffusion(40)
    torch.manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    t = torch.tensor([1, 7, 20, 39])
    xt = d.q_sample(x0, t, noise)
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = d.losses(exact, x0, xt, t, noise)
    assert terms["mse"] == 0 and abs(float(terms["vb"])) < 1e-4
    wrong = torch.cat([noise, torch.ones_like(noise)], dim=1)
    assert float(d.losses(wrong, x0, xt, t, noise)["vb"]) > 1e-2


def test_decoder_likelihood_is_a_distribution_over_the_grey_levels():
    levels = torch.linspace(-1, 1, 17).view(17, 1)
    mean, logvar = torch.full((17, 1), 0.1), torch.full((17, 1), -3.0)
    p = discretized_gaussian_log_likelihood(levels, mean, logvar).exp()
    assert abs(float(p.sum()) - 1) < 1e-5


def test_distillation_terms():
    a, b = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    t = distillation_terms(a, b, 1)
    assert torch.allclose(t["kd_eps"], ((a[:, :1] - b[:, :1]) ** 2).mean())
    assert torch.allclose(t["kd_var"], ((a[:, 1:] - b[:, 1:]) ** 2).mean())
    assert distillation_terms(a, a, 1)["kd_var"] == 0


def test_sampling_shape_and_range():
    d = GaussianDiffusion(5)

    def model(x, t, y):
        return torch.zeros(x.shape[0], 2, 8, 8)

    x = d.sample(model, torch.tensor([1, 2, 3]), (1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
