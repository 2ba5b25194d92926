"""So-ViT family: architecture facts from the paper, timm registration, and the contracts the engine relies on."""

import pytest
import timm
import torch

import pipeline.models  # noqa: F401  (registers sovit_* with timm)
from pipeline.models import forward_flops
from pipeline.models.sovit import token_grid

VARIANTS = {  # embed_dim, depth, heads, mlp hidden, d1, d2, head dropout
    "sovit_7": (256, 7, 4, 512, 48, 24, 0.0),
    "sovit_10": (256, 10, 4, 512, 48, 24, 0.0),
    "sovit_14": (384, 14, 6, 1152, 64, 48, 0.5),
    "sovit_19": (448, 19, 7, 1344, 96, 48, 0.5),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_architecture(name):
    dim, depth, heads, hidden, d1, d2, drop = VARIANTS[name]
    m = timm.create_model(name, num_classes=10)
    assert m.embed_dim == dim and len(m.blocks) == depth
    assert m.blocks[0].attn.num_heads == heads and m.blocks[0].mlp.fc1.out_features == hidden
    assert m.blocks[0].attn.qkv.bias is None  # qkv_bias=False as in T2T-ViT
    assert m.so_pool.reduce1[0].out_channels == d1 and m.so_pool.reduce2[0].out_channels == d2
    assert m.so_head.in_features == d1 * d2  # the full d1 x d2 matrix, not its upper triangle
    assert m.head_drop.p == drop
    assert m.patch_embed.num_patches == 196  # 224 px -> 14 x 14 visual tokens
    assert not m.pos_embed.requires_grad and m.pos_embed.shape == (1, 197, dim)  # fixed sinusoidal


def test_forward_shapes_and_head_switch():
    x = torch.randn(2, 3, 224, 224)
    m = timm.create_model("sovit_7", num_classes=5).eval()
    assert m(x).shape == (2, 5)
    assert m.forward_features(x).shape == (2, 197, 256)
    cls_only = timm.create_model("sovit_7", num_classes=5, head="cls").eval()
    assert cls_only.so_pool is None and cls_only(x).shape == (2, 5)
    assert sum(p.numel() for p in cls_only.parameters()) < sum(p.numel() for p in m.parameters())


def test_logits_are_cls_plus_second_order_branch():
    m = timm.create_model("sovit_7", num_classes=3).eval()
    tokens = m.forward_features(torch.randn(2, 3, 224, 224))
    expected = m.head(tokens[:, 0]) + m.so_head(m.so_pool(tokens[:, 1:]))
    torch.testing.assert_close(m.forward_head(tokens), expected)


@pytest.mark.parametrize(("size", "grid"), [(224, 14), (112, 14), (160, 20), (64, 8), (32, 4), (336, 14)])
def test_other_input_sizes(size, grid):
    assert token_grid(size) == grid
    m = timm.create_model("sovit_7", num_classes=4, img_size=size).eval()
    assert m.forward_features(torch.randn(2, 3, size, size)).shape == (2, grid * grid + 1, 256)


@pytest.mark.parametrize("size", [100, 24, 0])
def test_impossible_sizes_are_one_clear_line(size):
    with pytest.raises(ValueError, match=f"img_size={size} is invalid") as e:
        timm.create_model("sovit_7", img_size=size)
    assert "\n" not in str(e.value)


def test_variants_do_not_leak_config_into_each_other():
    a = timm.create_model("sovit_14", num_classes=7, drop_path_rate=0.3, embed_dim=192, num_heads=3)
    b = timm.create_model("sovit_14")
    assert a.embed_dim == 192 and b.embed_dim == 384 and b.num_classes == 1000
    assert isinstance(b.blocks[-1].drop_path1, torch.nn.Identity)  # drop_path_rate 0 by default
    assert a.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_drop_path_increases_linearly():
    m = timm.create_model("sovit_10", drop_path_rate=0.1)
    probs = [0.0] + [b.drop_path1.drop_prob for b in m.blocks[1:]]
    assert probs == pytest.approx(torch.linspace(0, 0.1, 10).tolist())


def test_timm_metadata_and_no_weight_decay():
    m = timm.create_model("sovit_19", num_classes=10)
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert set(timm.list_models("sovit_*")) == {"sovit_7", "sovit_10", "sovit_14", "sovit_19"}
    names = dict(m.named_parameters())
    assert {"cls_token", "so_pool.svpn_init"} <= m.no_weight_decay() and all(
        n in names or n == "pos_embed" for n in m.no_weight_decay())
    m.reset_classifier(3)
    assert m(torch.randn(2, 3, 224, 224)).shape == (2, 3)


def test_weights_load_through_timm_pretrained_file(tmp_path):
    """The export path: timm keeps the classifier only when the overlay states the file's num_classes."""
    from safetensors.torch import save_file

    src = timm.create_model("sovit_7", num_classes=4, img_size=64).eval()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = timm.create_model("sovit_7", pretrained=True, num_classes=4, img_size=64,
                            pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors"), "num_classes": 4}).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(dst(x), src(x))


def test_bf16_autocast_training_step_is_finite():
    m = timm.create_model("sovit_7", num_classes=4, img_size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(torch.randn(4, 3, 64, 64)).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_forward_flops_counts_the_transformer():
    small, large = (timm.create_model(n, num_classes=10) for n in ("sovit_7", "sovit_14"))
    f7, f14 = forward_flops(small, 224), forward_flops(large, 224)
    # transformer blocks alone: depth x tokens x (2 x 12 d^2-ish) — a sanity floor, not the full count
    assert f7 > 7 * 197 * 2 * 8 * 256**2 and f14 > 3 * f7


def test_layer_decay_groups_run_from_embedding_through_blocks_to_head():
    """timm's layer-wise lr decay reads ``group_matcher``: the whole token embedding is one stem group, each block
    its own, and every head parameter (both classifiers and the second-order branch) gets the full lr."""
    from timm.optim import create_optimizer_v2

    m = timm.create_model("sovit_7", num_classes=4, img_size=32)
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    by_id = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    scale = {name: by_id[id(p)] for name, p in m.named_parameters()}
    assert len(scale) == sum(1 for _ in m.parameters())  # every parameter is in a group

    def scales(prefix: str) -> set[float]:
        return {s for n, s in scale.items() if n.startswith(prefix)}

    embed = scales("patch_embed") | scales("cls_token")
    blocks = [scales(f"blocks.{i}.") for i in range(len(m.blocks))]
    head = scales("head") | scales("so_pool") | scales("so_head")
    assert len(embed) == 1 and all(len(b) == 1 for b in blocks) and head == {1.0}
    order = [*embed, *(b.pop() for b in blocks), 1.0]
    assert order == sorted(order) and len(set(order)) == len(order)  # embed < block 0 < ... < block 6 < head
    assert scales("norm.") == {order[-2]}  # the final norm goes with the last block, as in timm's ViT
    assert order[0] == pytest.approx(0.75 ** (len(m.blocks) + 1))


def test_grad_checkpointing_recomputes_blocks_with_the_same_loss_and_grads():
    """Seeded, with drop path and dropout on: the recomputation replays the RNG, so nothing changes but memory.
    Measured on CPU over 20 seeds: max |difference| = 0 for the loss and every gradient."""

    def step(enable: bool) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        m = timm.create_model("sovit_7", num_classes=4, img_size=32, drop_path_rate=0.2, drop_rate=0.1)
        m.set_grad_checkpointing(enable)
        calls = []
        m.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        return len(calls), loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    (calls_off, loss_off, grads_off), (calls_on, loss_on, grads_on) = step(False), step(True)
    assert (calls_off, calls_on) == (1, 2)  # checkpointed: block 0 ran again in backward
    assert torch.equal(loss_off, loss_on)
    for name, grad in grads_off.items():
        assert torch.equal(grad, grads_on[name]), name
