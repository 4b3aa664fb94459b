import math

import torch

from breastfusion.models.arcface import ArcFaceEmbedding, ArcMarginHead


def _head(scale=1.0, margin=0.5):
    torch.manual_seed(0)
    return ArcMarginHead(8, 3, scale=scale, margin=margin)


def test_margin_on_target_only_in_training():
    head = _head()
    emb = torch.randn(5, 8)
    target = torch.tensor([0, 1, 2, 1, 0])
    cos = head.cosines(emb).detach()
    head.train()
    out = head(emb, target).detach()
    theta = torch.acos(cos.clamp(-1, 1))
    for i, t in enumerate(target.tolist()):
        for j in range(3):
            expected = math.cos(theta[i, j] + 0.5) if j == t else cos[i, j]
            if j == t and theta[i, j] + 0.5 > math.pi:
                expected = cos[i, j] - math.sin(math.pi - 0.5) * 0.5
            assert torch.isclose(out[i, j], torch.as_tensor(expected, dtype=out.dtype), atol=1e-5)
    head.eval()
    assert torch.allclose(head(emb, target), cos, atol=1e-6)  # plain cosines in eval
    assert torch.allclose(head(emb), cos, atol=1e-6)


def test_scale_multiplies_cosines():
    head = _head(scale=30.0)
    head.eval()
    emb = torch.randn(4, 8)
    assert torch.allclose(head(emb), 30.0 * head.cosines(emb), atol=1e-5)


def test_finite_values_and_gradients_at_extremes():
    head = _head(scale=30.0)
    head.train()
    centres = torch.nn.functional.normalize(head.centres.detach(), dim=-1)
    emb = torch.stack([centres[0], -centres[0], centres[1]]).clone().requires_grad_(True)  # cos = +1, -1
    target = torch.tensor([0, 0, 1])
    out = head(emb, target)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, target).backward()
    assert torch.isfinite(emb.grad).all()
    assert torch.isfinite(head.centres.grad).all()


def test_theta_plus_margin_beyond_pi_stays_monotonic():
    head = _head(margin=0.5)
    cos = torch.linspace(-1, 1, 2001).unsqueeze(1).repeat(1, 3)
    target = torch.zeros(len(cos), dtype=torch.long)
    phi = head.margin_cosines(cos, target)[:, 0]
    assert torch.isfinite(phi).all()
    assert (phi[1:] - phi[:-1] >= -1e-6).all()  # never increases as theta grows past pi - m
    assert (phi <= cos[:, 0] + 1e-6).all()  # the margin only makes the target harder


def test_embedding_layer_gives_cosines():
    layer = ArcFaceEmbedding(12, 6, scale=30.0)
    x = torch.randn(3, 12) * 100
    out = layer(x)
    assert out.shape == (3, 6)
    assert (out.abs() <= 30 * (1 + 1e-6)).all()
    w = torch.nn.functional.normalize(layer.weight, dim=-1)
    assert torch.allclose(out / 30, torch.nn.functional.normalize(x, dim=-1) @ w.T, atol=1e-6)
    assert torch.allclose(layer(x * 7), out, atol=1e-6)  # scale-invariant in the feature
