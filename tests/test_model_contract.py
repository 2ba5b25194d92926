"""So-ViT through the entry points timm's own model tests exercise (huggingface/pytorch-image-models
tests/test_models.py): the same calls and the same checks, for every variant, with one difference each where So-ViT
says more (outputs compared by value, not only by shape).

timm files ViTs under its "non-standard" models: tokens out of ``forward_features``, no spatial pooling to switch
off, so no ``reset_classifier(0, '')`` / ``global_pool=''`` checks. Forward passes run at the default 224 px input
(``fixed_input_size``), as timm would run them; backward passes, at 64 px (the same code, a twelfth of the work on
the 2-core CI machine), use a batch of 2, as timm's do. Each model is built once and copied: building sovit_19 costs
more than running it.
"""

import copy
import functools
import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import pipeline.models  # noqa: F401  (registers sovit_* with timm)

VARIANTS = ["sovit_7", "sovit_10", "sovit_14", "sovit_19"]
EMBEDDING = {"sovit_7": 256 + 48 * 24, "sovit_10": 256 + 48 * 24, "sovit_14": 384 + 64 * 48, "sovit_19": 448 + 96 * 48}
TRACER = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(),
          "param_shapes_constant": True}  # timm's own tracer settings (its _create_fx_model)


def image(batch: int = 1, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def model(name: str, **kwargs) -> torch.nn.Module:
    return copy.deepcopy(_built(name, tuple(sorted(kwargs.items()))))


@functools.cache
def _built(name: str, kwargs: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **dict(kwargs))


def fx_model(m: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's ``_create_fx_model``: torchvision's feature extractor, returning the last graph node."""
    train_nodes, eval_nodes = get_graph_node_names(m, tracer_kwargs=TRACER)
    return create_feature_extractor(m, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=TRACER)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_and_grad_checkpointing(name):
    """timm ``test_model_forward``: gradient checkpointing leaves the output unchanged."""
    m, x = model(name).eval(), image()
    out = m(x)
    assert out.shape == (1, 1000) and not out.isnan().any()
    m.set_grad_checkpointing()
    torch.testing.assert_close(m(x), out, rtol=1e-4, atol=1e-5)  # timm's tolerance


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_reaches_every_parameter(name):
    """timm ``test_model_backward``: every parameter, the learned SVPN start vectors included, gets a gradient."""
    m = model(name, num_classes=42, img_size=64).train()
    out = m(image(2, 64))
    out.mean().backward()
    assert out.shape == (2, 42) and not out.isnan().any()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", VARIANTS)
def test_embedding_is_pre_logits_of_width_head_hidden_size(name):
    """timm ``test_model_default_cfgs_non_std``: ``num_classes=0`` and ``reset_classifier(0)`` give the pooled
    embedding, ``forward_head(pre_logits=True)``, of width ``head_hidden_size``; ``forward_features`` gives tokens of
    width ``num_features``. Compared by value, and the embedding is what the two classifiers read: [W_cls W_so]."""
    m, x = model(name).eval(), image(2)
    assert m.num_classes == 1000 and m.num_features == m.embed_dim and m.head_hidden_size == EMBEDDING[name]
    tokens = m.forward_features(x)
    embedding = m.forward_head(tokens, pre_logits=True)
    assert tokens.shape == (2, 197, m.num_features) and embedding.shape == (2, m.head_hidden_size)
    weight = torch.cat([m.head.weight, m.so_head.weight], dim=1)
    # measured: max |difference| 1.2e-6 over the four variants (fp32 sums in a different order)
    torch.testing.assert_close(embedding @ weight.T + m.head.bias + m.so_head.bias, m(x), rtol=0, atol=1e-5)

    m.reset_classifier(0)
    assert m.num_classes == 0 and m.head_hidden_size == EMBEDDING[name]
    torch.testing.assert_close(m(x), embedding, rtol=0, atol=0)
    headless = model(name, num_classes=0).eval()
    headless.load_state_dict(m.state_dict())
    torch.testing.assert_close(headless(x), embedding, rtol=0, atol=0)


def test_class_token_model_embeds_its_class_token():
    m, x = model("sovit_7", head="cls", num_classes=0).eval(), image(2)
    assert m.head_hidden_size == m.num_features == 256
    torch.testing.assert_close(m(x), m.forward_features(x)[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_default_cfg_names_real_layers(name):
    """timm ``test_model_default_cfgs``: the classifier and first-conv names in the config are in the state dict,
    and the config carries what timm's data config and model card read."""
    m = model(name)
    cfg, keys = m.default_cfg, m.state_dict().keys()
    assert all(f"{c}.weight" in keys for c in cfg["classifier"]) and f"{cfg['first_conv']}.weight" in keys
    assert cfg["architecture"] == name and cfg["fixed_input_size"] and cfg["min_input_size"] == (3, 32, 32)
    assert cfg["paper_ids"] == "arXiv:2104.10935" and cfg["origin_url"].startswith("https://")
    assert timm.data.resolve_data_config({}, model=m)["input_size"] == (3, 224, 224)


@pytest.mark.parametrize("name", VARIANTS)
def test_torchscript_matches_eager(name):
    """timm ``test_model_forward_torchscript``, with the scripted output held to the eager one."""
    with timm.set_scriptable(True):
        m = model(name).eval()
    x = image()
    scripted = torch.jit.script(m)
    # measured: max |difference| 0 on every variant (the same kernels in the same order)
    torch.testing.assert_close(scripted(x), m(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_intermediates(name):
    """timm ``test_model_forward_intermediates``: one NCHW map per block, of ``feature_info``'s channels and
    reduction, and the final output is ``forward_features`` (checkpointed too)."""
    m, x = model(name).eval(), image()
    info = FeatureInfo(m.feature_info, len(m.feature_info))
    assert len(info.channels()) == len(m.blocks) >= 3
    final, intermediates = m.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(m.blocks)
    check_feature_maps(intermediates, info.channels(), info.reduction(), 224, "NCHW")
    torch.testing.assert_close(final, m.forward_features(x), rtol=0, atol=0)
    m.set_grad_checkpointing()
    torch.testing.assert_close(m.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


def check_feature_maps(maps, channels, reductions, size, fmt) -> None:
    feat_axis, (h_axis, w_axis) = get_channel_dim(fmt), get_spatial_dim(fmt)
    for o, c, r in zip(maps, channels, reductions, strict=True):
        assert o.shape[0] == 1 and o.shape[feat_axis] == c and not o.isnan().any()
        assert o.shape[h_axis] <= math.ceil(size / r) + 1 and o.shape[w_axis] <= math.ceil(size / r) + 1


def test_intermediates_select_blocks_and_formats():
    """The selection and layout options of timm's ViT ``forward_intermediates``, checked against block outputs."""
    m, x = model("sovit_7", img_size=64).eval(), image(2, 64)
    hooked = []
    for block in m.blocks:
        block.register_forward_hook(lambda _m, _i, out: hooked.append(out))
    tokens = m.forward_features(x)
    pairs = m.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", norm=True, return_prefix_tokens=True,
                                    intermediates_only=True, stop_early=True)
    for (spatial, prefix), block_out in zip(pairs, [hooked[0], hooked[6]], strict=True):
        torch.testing.assert_close(spatial, m.norm(block_out)[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(prefix, m.norm(block_out)[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(pairs[-1][0], tokens[:, 1:], rtol=0, atol=0)  # last block normed == forward_features
    (last,) = m.forward_intermediates(x, indices=1, intermediates_only=True)
    assert last.shape == (2, 256, 8, 8)  # 64 px -> 8 x 8 tokens
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), hooked[6][:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt='NHWC' is invalid"):
        m.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", VARIANTS)
def test_features_only(name):
    """timm ``test_model_forward_intermediates_features``: ``features_only=True`` wraps the model in timm's feature
    getter; the last three blocks come out, and the pruned model drops everything after them."""
    m = model(name, features_only=True).eval()
    assert m.feature_info.channels() == [m.model.embed_dim] * 3 and m.feature_info.reduction() == [16] * 3
    maps = m(image())
    assert len(maps) == 3
    check_feature_maps(maps, m.feature_info.channels(), m.feature_info.reduction(), 224, "NCHW")
    full = model(name).eval()
    torch.testing.assert_close(maps, full.forward_intermediates(image(), indices=3, intermediates_only=True),
                               rtol=0, atol=0)
    assert m.model.so_pool is None and m.model.num_classes == 0 and isinstance(m.model.norm, torch.nn.Identity)


def test_features_only_out_indices_and_fx_feature_extractor():
    """``out_indices`` picks blocks; ``feature_cls='fx'`` is timm's fx feature extractor over the same blocks."""
    getter = model("sovit_7", features_only=True, out_indices=(1, 3)).eval()
    fx = model("sovit_7", features_only=True, out_indices=(1, 3), feature_cls="fx").eval()
    assert len(getter.model.blocks) == 4 and fx.feature_info.module_name() == ["blocks.1", "blocks.3"]
    x = image()
    with torch.no_grad():
        tokens = fx(x)
        for grid, seq in zip(getter(x), tokens, strict=True):
            torch.testing.assert_close(grid, seq[:, 1:].transpose(1, 2).reshape(1, 256, 14, 14), rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_forward_matches_eager(name):
    """timm ``test_model_forward_fx``: the traced graph gives the eager output exactly; plain ``symbolic_trace``
    works too (SVPN is recorded as one call, see pipeline/models/sovit.py)."""
    m, x = model(name).eval(), image()
    with torch.inference_mode():
        out = m(x)
        (traced,) = fx_model(m)(x).values()
        plain = torch.fx.symbolic_trace(m)(x)
    assert torch.equal(traced, out) and torch.equal(plain, out)


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_backward(name):
    """timm ``test_model_backward_fx``: the traced train-mode graph reaches every parameter."""
    m = fx_model(model(name, num_classes=42, img_size=64).train(), train=True)
    (out,) = m(image(2, 64)).values()
    out.mean().backward()
    assert out.shape == (2, 42) and not out.isnan().any()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []


def test_fx_then_torchscript():
    """timm ``test_model_forward_fx_torchscript``: the traced graph scripts too."""
    with timm.set_scriptable(True):
        m = model("sovit_7").eval()
    x = image()
    scripted = torch.jit.script(fx_model(m))
    with torch.inference_mode():
        (out,) = scripted(x).values()
        torch.testing.assert_close(out, m(x), rtol=0, atol=1e-6)


def test_global_pool_is_one_clear_line():
    m = model("sovit_7", img_size=32)
    with pytest.raises(ValueError, match="global_pool='avg' is invalid") as e:
        m.reset_classifier(0, "avg")
    assert "\n" not in str(e.value)
