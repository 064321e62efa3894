"""The denoiser and value nets and how a config builds them: properties a shape test would not
see (skips, the time embedding, every parameter in use, plans independent of their batch)."""
from __future__ import annotations

import pytest
import torch

from _helpers import SMOKE_CONFIG, TINY, gaussian_normalizer
from distdiff import config
from distdiff.models import build_models, layout_of
from distdiff.nn.temporal import SinusoidalPosEmb, TemporalUnet, ValueNet

H, D = 8, 3


def _nets(returns_condition: bool = False):
    # dim 16: two channels per norm group, so no conv bias is normalized away to a zero gradient
    torch.manual_seed(0)
    unet = TemporalUnet(horizon=H, transition_dim=D, dim=16, dim_mults=(1, 2), returns_condition=returns_condition)
    value = ValueNet(horizon=H, transition_dim=D, dim=16, dim_mults=(1, 2))
    return unet, value


def test_the_time_embedding_puts_each_frequency_on_the_unit_circle():
    # sin and cos of the same angle: every timestep's embedding has the same norm and t=0 is not
    # the zero vector (a sin-only embedding maps t=0 to zeros and aliases high frequencies).
    emb = SinusoidalPosEmb(16)(torch.tensor([0, 1, 7, 19]))
    assert emb.shape == (4, 16)
    torch.testing.assert_close(emb[:, :8] ** 2 + emb[:, 8:] ** 2, torch.ones(4, 8))
    torch.testing.assert_close(emb[0], torch.cat([torch.zeros(8), torch.ones(8)]))


def test_every_parameter_of_the_denoiser_and_value_net_shapes_their_output():
    # A block, a time projection or a level that the forward pass skips still has the right
    # shapes, trains nothing and would go unnoticed by a shape test.
    unet, value = _nets()
    x, t = torch.randn(3, H, D), torch.tensor([0, 4, 9])
    w = torch.randn(3, H, D)
    ((unet(x, t) * w).sum() + (value(x, t) * torch.randn(3)).sum()).backward()
    dead = [f"{net}.{name}" for net, m in (("unet", unet), ("value", value)) for name, p in m.named_parameters()
            if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_the_denoisers_output_depends_on_the_noise_level():
    # An ε/x₀ prediction that ignores t cannot undo different amounts of noise.
    unet, value = _nets()
    x = torch.randn(1, H, D).expand(2, H, D)
    t = torch.tensor([1, 40])
    out = unet(x, t)
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    v = value(x, t)
    assert not torch.allclose(v[0], v[1], atol=1e-4)


def test_the_decoder_gets_the_encoders_features_at_each_resolution():
    # The U-Net's skip connections: each up level is fed, beside the coarser features, the
    # encoder's output at its own resolution (what makes fine detail of the trajectory
    # recoverable). Dropped or swapped skips keep every shape.
    torch.manual_seed(0)
    unet = TemporalUnet(horizon=16, transition_dim=D, dim=8, dim_mults=(1, 2, 4))
    enc, dec = {}, {}
    for i, (_, block2, _) in enumerate(unet.downs):
        block2.register_forward_hook(lambda m, args, out, i=i: enc.__setitem__(i, out))
    for j, (block1, _, _) in enumerate(unet.ups):
        block1.register_forward_hook(lambda m, args, out, j=j: dec.__setitem__(j, args[0]))
    unet(torch.randn(2, 16, D), torch.tensor([3, 5]))
    assert len(dec) == len(unet.downs) - 1
    for j, fed in dec.items():
        skip = enc[len(unet.downs) - 1 - j]
        torch.testing.assert_close(fed[:, fed.shape[1] - skip.shape[1]:], skip, rtol=0, atol=0)


def test_a_masked_return_is_the_unconditional_denoiser():
    # Classifier-free guidance subtracts the unconditional prediction, made with returns_mask 0:
    # a mask that is ignored makes both the same, and guidance by return does nothing.
    unet, _ = _nets(returns_condition=True)
    torch.nn.init.normal_(unet.returns_mlp[-1].weight)  # as after training (it starts at zero)
    x, t = torch.randn(2, H, D), torch.tensor([3, 3])
    returns = torch.tensor([0.9, 0.9])
    unconditional = unet(x, t)
    torch.testing.assert_close(unet(x, t, returns, torch.zeros(2)), unconditional)
    mixed = unet(x, t, returns, torch.tensor([1.0, 0.0]))
    assert not torch.allclose(mixed[0], unconditional[0], atol=1e-4)
    torch.testing.assert_close(mixed[1], unconditional[1])
    torch.testing.assert_close(unet(x, t, returns, torch.ones(2)), unet(x, t, returns))


@pytest.mark.parametrize("net", ["unet", "value"])
def test_a_trajectorys_output_does_not_depend_on_the_rest_of_its_batch(net):
    # Plans sampled together (n_candidates, one per env) must each be what it would be alone,
    # in training mode too (where a batch norm would mix them).
    model = dict(zip(("unet", "value"), _nets()))[net].train()
    x = torch.randn(3, H, D)
    t = torch.tensor([2, 2, 2])
    a = model(x, t)
    b = model(torch.cat([x[:1], 5 * torch.randn(2, H, D)]), t)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(model(x[:1], t[:1])[0], a[0])


def _models(**overrides):
    cfg = config.load(SMOKE_CONFIG, overrides={**TINY, **overrides})
    return cfg, build_models(cfg, gaussian_normalizer(layout_of(cfg).transition_dim))


def test_each_net_is_built_with_its_own_config_sizes():
    # value_dim, kernel_size and dynamics_dim each size their own net: a pretrain with
    # --model.value_dim 64 that built a width-8 value net would train and checkpoint the wrong one.
    cfg, m = _models(**{"model.dim": 8, "model.value_dim": 16, "model.kernel_size": 3, "model.dynamics_dim": 24})
    assert m.denoiser.time_mlp[1].in_features == 8 and m.value.time_mlp[1].in_features == 16
    assert {c.kernel_size for c in m.value.modules() if isinstance(c, torch.nn.Conv1d) and c.kernel_size != (1,)} \
        >= {(3,)} and (5,) not in {c.kernel_size for c in m.value.modules() if isinstance(c, torch.nn.Conv1d)}
    assert m.dynamics.net[0].out_features == 24
    assert set(m.nets()) == {"denoiser", "value", "dynamics"}


def test_the_diffusion_weights_the_first_action_and_clips_as_configured():
    cfg, m = _models(**{"diffusion.action_weight": 7.0})
    layout = layout_of(cfg)
    assert torch.all(m.diffusion.loss_weights[0, layout.action_slice] == 7.0)
    assert m.diffusion.clip_min is not None
    _, unclipped = _models(**{"diffusion.clip_denoised": False})
    assert unclipped.diffusion.clip_min is None and unclipped.diffusion.clip_max is None


def test_building_the_dynamics_model_draws_nothing_from_the_global_generator():
    # The denoiser and value net initialize, and training noise is drawn, as they were before the
    # dynamics model existed: a benchmark's prior stays reproducible from its seed.
    cfg = config.load(SMOKE_CONFIG, overrides=TINY)
    layout = layout_of(cfg)
    torch.manual_seed(3)
    _models()
    after_build = torch.rand(3)
    torch.manual_seed(3)
    TemporalUnet(horizon=cfg.model.horizon, transition_dim=layout.transition_dim, dim=cfg.model.dim,
                 dim_mults=cfg.model.dim_mults, kernel_size=cfg.model.kernel_size)
    ValueNet(horizon=cfg.model.horizon, transition_dim=layout.transition_dim, dim=cfg.model.value_dim,
             dim_mults=cfg.model.dim_mults, kernel_size=cfg.model.kernel_size)
    torch.testing.assert_close(after_build, torch.rand(3), rtol=0, atol=0)
