"""ViT and DiT shapes, DiT's adaLN-Zero start, LiT's weight inheritance."""
import pytest
import torch

from linattn.vision.models import DiT, VisionConfig, ViT, build_vision_model, inherit_weights, sincos_2d


@pytest.mark.parametrize("mixer", ["attention", "linear", "mala", "lit"])
def test_vit_logits_and_gradients(mixer):
    cfg = VisionConfig(mixer=mixer, d_model=32, n_layers=2, patch_size=2, backend="torch")
    model = ViT(cfg)
    logits = model(torch.randn(3, 1, 8, 8))
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert (model.blocks[0].cpe is not None) == (mixer == "mala")


def test_dit_starts_at_zero_and_patchifies_back():
    cfg = VisionConfig(model_type="dit", mixer="lit", d_model=32, n_layers=2, patch_size=2)
    model = DiT(cfg)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 5]), torch.tensor([3, 7])
    assert torch.equal(model(x, t, y), torch.zeros(2, 2, 8, 8))  # adaLN-Zero + zero final layer


def test_unpatchify_inverts_the_patch_embedding_layout():
    from linattn.vision.models import PatchEmbed, unpatchify

    cfg = VisionConfig(mixer="attention", d_model=4, n_heads=1, patch_size=2)
    embed = PatchEmbed(cfg)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.eye(4))
        embed.proj.bias.zero_()
    img = torch.randn(2, 1, 8, 8)
    tokens = embed(img)  # [2, 16, 4]: patch (r, c) -> token r * 4 + c
    assert torch.equal(tokens[0, 1], img[0, 0, 0:2, 2:4].flatten())
    assert torch.equal(unpatchify(tokens, cfg, 1), img)


def test_sincos_2d_rows_and_columns():
    pos = sincos_2d(16, (3, 4))
    assert pos.shape == (12, 16)
    assert torch.equal(pos[0, :8], pos[3, :8])  # same row, row half equal
    assert torch.equal(pos[0, 8:], pos[4, 8:])  # same column, column half equal
    assert not torch.equal(pos[0, :8], pos[4, :8])


def test_inherit_weights_copies_all_but_the_mixers():
    teacher = build_vision_model(VisionConfig(model_type="dit", mixer="attention", d_model=32, n_layers=2), "cpu", 1)
    for p in teacher.parameters():
        p.data.normal_()
    student = build_vision_model(VisionConfig(model_type="dit", mixer="lit", d_model=32, n_layers=2), "cpu", 2)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    with torch.no_grad():
        copied = inherit_weights(student, teacher.state_dict())
    own, ts = student.state_dict(), teacher.state_dict()
    assert copied and all(".mixer." not in n for n in copied)
    for name, t in own.items():
        if ".mixer." in name:
            assert torch.equal(t, before[name]), name  # the linear attention's own: untouched
        elif name in ts:
            assert torch.equal(t, ts[name]), name
    wide = build_vision_model(VisionConfig(model_type="dit", mixer="attention", d_model=64, n_layers=2), "cpu", 1)
    with pytest.raises(ValueError, match="the teacher must have the student's d_model"):
        inherit_weights(student, wide.state_dict())


def test_config_errors():
    with pytest.raises(ValueError, match="unknown vision mixer"):
        VisionConfig(mixer="gla").validate()
    with pytest.raises(ValueError, match="patch_size 3 does not divide"):
        VisionConfig(patch_size=3).validate()
    with pytest.raises(ValueError, match="inherit_from"):
        VisionConfig(inherit_from="runs/x").validate()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mixer", ["attention", "linear", "mala", "lit"])
def test_models_train_step_under_bf16_autocast(mixer, device):
    """A ViT and a DiT step under bf16 autocast (the training set-up; on CUDA through the
    Triton kernels, whose q, k, v must arrive in one dtype): finite loss and gradients for
    every parameter."""
    for model_type in ("vit", "dit"):
        cfg = VisionConfig(model_type=model_type, mixer=mixer, d_model=64, n_layers=2)
        model = build_vision_model(cfg, device, 0)
        x = torch.randn(16, 1, 8, 8, device=device)
        y = torch.randint(0, 10, (16,), device=device)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(x) if model_type == "vit" else model(x, torch.randint(0, 100, (16,), device=device), y)
        loss = (out.float() - 1).square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
