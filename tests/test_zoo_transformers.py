"""Transformer blocks through the graph path: exact by default, widths through norms and attention with exact=False.

Three blocks, written here as small modules: nn.TransformerEncoderLayer (nn.MultiheadAttention), a ViT-style
encoder block with its own q/k/v/o attention, and a LLaMA-style block (RMSNorm, SwiGLU, q/k/v/o attention).
By default only what is exact is pruned (== mask_graph); with exact=False the residual stream through the
norms and attention is pruned too, runs, exports to ONNX and is as small as Torch-Pruning's MetaPruner makes it.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from eigenprune import prune_nodes, spectralize
from eigenprune.pruning.graph import is_rmsnorm, mask_graph, prune_graph, select_channels
from eigenprune.pruning.keep import PruneError


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """q/k/v/o projections, `num_heads` heads, a scale fixed at construction (as timm's and HF's)."""

    def __init__(self, d, heads, bias=True, sdpa=False):
        super().__init__()
        self.num_heads, self.sdpa = heads, sdpa
        self.scale = (d // heads) ** -0.5
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=bias) for _ in range(4))

    def split(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.sdpa:  # its default scale is 1/sqrt(the current head width)
            h = F.scaled_dot_product_attention(q, k, v)
        else:
            h = (q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v
        return self.o(h.transpose(1, 2).flatten(2))


class HeadlessAttention(Attention):
    """The same attention with its head count hidden (no num_heads attribute)."""

    def __init__(self, d, heads):
        super().__init__(d, heads)
        self.h = self.__dict__.pop("num_heads")

    def split(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.h, -1).transpose(1, 2)


class FusedAttention(nn.Module):
    """timm-style: one qkv projection, split with reshape + unbind."""

    def __init__(self, d, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (d // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        h = (q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v
        return self.proj(h.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Llama(nn.Module):
    def __init__(self, d_in=6, d=16, heads=4, hidden=24, out=3, norm=RMSNorm):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.n1, self.attn = norm(d), Attention(d, heads, bias=False)
        self.n2, self.mlp = norm(d), SwiGLU(d, hidden)
        self.norm, self.head = norm(d), nn.Linear(d, out)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.n1(x))
        x = x + self.mlp(self.n2(x))
        return self.head(self.norm(x).mean(1))


class ViT(nn.Module):
    def __init__(self, d_in=6, d=16, heads=4, hidden=32, out=3, attention=Attention):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.n1, self.attn = nn.LayerNorm(d), attention(d, heads)
        self.n2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, out)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.n1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.n2(x))))
        return self.head(self.norm(x).mean(1))


class Encoder(nn.Module):
    def __init__(self, d_in=6, d=16, heads=4, ff=32, out=3):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


BLOCKS = {"encoder": Encoder, "vit": ViT, "llama": Llama}
EXACT_GROUPS = {"encoder": {"layer.linear1"}, "vit": {"fc1", "attn.v"}, "llama": {"mlp.up", "attn.v"}}
NORM = {"encoder": "LayerNorm", "vit": "LayerNorm", "llama": "RMSNorm"}


def _model(kind, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = BLOCKS[kind]().to(dtype).eval()
    with torch.no_grad():  # norms that are not the identity
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model, torch.randn(2, 5, 6, dtype=dtype)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _head_consistent(kept, width, heads):
    per_head = kept.view(heads, -1) % (width // heads)
    return bool((per_head == per_head[0]).all())


@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("spectral", [False, True])
def test_by_default_what_is_exact_is_pruned_and_equals_the_masked_model(kind, spectral):
    model, x = _model(kind)
    if spectral:
        model = spectralize(model)
    for keep in (0.5, 0.25, 3):
        plan = select_channels(model, keep, x)
        assert set(plan.kept) == EXACT_GROUPS[kind] and not plan.inexact
        assert NORM[kind] in plan.left_alone["embed"]  # the residual stream: through the norms, left alone with the reason
        pruned, masked = prune_graph(model, plan, x), mask_graph(model, plan, x)
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(masked(x), model(x)) and _params(pruned) < _params(model)
    if kind != "encoder":  # q, k, v share one group, split into 4 heads that keep the same positions (keep=3 -> 4)
        assert plan.members["attn.q"] == plan.members["attn.k"] == "attn.v" and plan.blocks == {"attn.v": 4}
        assert len(plan.kept["attn.v"]) == 4 and _head_consistent(plan.kept["attn.v"], 16, 4)
    if kind == "llama":  # SwiGLU: gate and up produce the hidden channels together, cut exactly
        assert plan.members["mlp.gate"] == plan.members["mlp.up"] == "mlp.up"
        assert pruned.mlp.gate.out_features == pruned.mlp.up.out_features == pruned.mlp.down.in_features == 3


def _torch_pruning(model, x, keep):
    """Torch-Pruning 1.6.1's MetaPruner, magnitude importance p=2, heads declared as its docs ask."""
    model = copy.deepcopy(model)
    heads, groups = {}, {}
    for m in model.modules():
        if isinstance(m, Attention):
            heads.update({m.q: m.num_heads, m.k: m.num_heads, m.v: m.num_heads})
        elif isinstance(m, nn.MultiheadAttention):
            groups[m] = m.num_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its note on unwrapped parameters (the RMSNorm weights)
        tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=1 - keep,
                             ignored_layers=[model.head], num_heads=heads, out_channel_groups=groups).step()
    return model


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_exact_false_prunes_the_stream_through_norms_and_attention_as_far_as_torch_pruning(kind):
    model, x = _model(kind, dtype=torch.float32)
    for keep in (0.5, 0.25):
        plan = select_channels(model, keep, x, exact=False)
        stream = plan.members["embed"]
        assert NORM[kind] in plan.inexact[stream] and set(plan.kept) == EXACT_GROUPS[kind] | {stream}
        assert "not exact: through" in str(plan)
        ours = prune_nodes(model, keep, example_inputs=x, exact=False)
        assert ours.embed.out_features == 16 * keep and ours(x).shape == (2, 3)
        theirs = _torch_pruning(model, x, keep)
        assert theirs(x).shape == (2, 3)
        ratio_ours, ratio_theirs = _params(ours) / _params(model), _params(theirs) / _params(model)
        assert abs(ratio_ours - ratio_theirs) <= 0.02, (keep, ratio_ours, ratio_theirs)
        with pytest.raises(PruneError, match=f"mask_graph has no masked model for this plan: it cuts {stream}'s channels through"):
            mask_graph(model, plan, x)
    if kind == "encoder":  # nn.MultiheadAttention: embed_dim 16 -> 4, still 4 heads, each keeping the same position
        attn = ours.layer.self_attn
        assert attn.embed_dim == 4 and attn.num_heads == 4 and attn.head_dim == 1 and attn.in_proj_weight.shape == (12, 4)
        assert plan.blocks[stream] == 4 and _head_consistent(plan.kept[stream], 16, 4)


def test_exact_false_means_the_network_without_those_channels_each_norm_over_the_kept_ones():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_(0, 0.3)
    x = torch.randn(7, 4, dtype=torch.float64)
    plan = select_channels(model, 3, x, exact=False)
    kept = plan.kept["0"]
    pruned = prune_graph(model, plan, x)
    a, ln, b = model[0], model[1], model[3]
    h = F.layer_norm(F.linear(x, a.weight[kept], a.bias[kept]), (3,), ln.weight[kept], ln.bias[kept], ln.eps)
    torch.testing.assert_close(pruned(x), F.linear(torch.relu(h), b.weight[:, kept], b.bias), rtol=1e-12, atol=1e-12)
    with pytest.raises(PruneError, match="0: it shares channels with 1, which is a LayerNorm"):
        select_channels(model, 3, x)  # by default: nothing here can be cut exactly
    same = prune_graph(model, select_channels(model, 1.0, x, exact=False), x)
    torch.testing.assert_close(same(x), model(x), rtol=1e-12, atol=1e-12)  # nothing cut: nothing changes


def test_group_norm_keeps_its_groups_even_with_exact_false():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 3, 3)).eval()
    x = torch.randn(2, 2, 7, 7)
    with pytest.raises(PruneError, match="0: it shares channels with 1, which is a GroupNorm"):
        select_channels(model, 0.5, x)
    plan = select_channels(model, 3, x, exact=False)
    assert plan.blocks == {"0": 2} and len(plan.kept["0"]) == 4 and _head_consistent(plan.kept["0"], 8, 2)
    pruned = prune_graph(model, plan, x)
    assert pruned[1].num_channels == 4 and pruned[1].num_groups == 2 and pruned(x).shape == (2, 3, 3, 3)


def test_attention_of_unknown_heads_or_sdpa_is_left_alone_with_the_reason():
    model, x = _model("vit")
    headless = ViT(attention=HeadlessAttention).double().eval()
    for exact in (True, False):
        plan = select_channels(headless, 0.5, x, exact=exact)
        assert "attn.v" not in plan.kept and "number of heads is unknown" in plan.left_alone["attn.v"]
    torch.manual_seed(0)
    sdpa = ViT(attention=lambda d, h: Attention(d, h, sdpa=True)).double().eval()
    assert "scaled_dot_product_attention" in select_channels(sdpa, 0.5, x).left_alone["attn.v"]
    plan = select_channels(sdpa, 0.5, x, exact=False)
    assert "attn.v" in plan.kept and plan.inexact["attn.v"] == "scaled_dot_product_attention" and plan.blocks["attn.v"] == 4
    assert prune_graph(sdpa, plan, x).attn.q.out_features == 8


def test_a_fused_qkv_projection_is_cut_by_whole_positions_of_its_twelve_head_slices():
    torch.manual_seed(0)
    model, x = ViT(attention=FusedAttention).double().eval(), torch.randn(2, 5, 6, dtype=torch.float64)
    for keep, width in ((0.5, 24), (0.25, 12), (3, 12)):  # q, k, v x 4 heads = 12 slices of 4, each keeping the same positions
        plan = select_channels(model, keep, x)
        assert plan.blocks["attn.qkv"] == 12 and len(plan.kept["attn.qkv"]) == width
        pruned = prune_graph(model, plan, x)
        assert pruned.attn.qkv.out_features == width and pruned.attn.proj.in_features == width // 3
        torch.testing.assert_close(pruned(x), mask_graph(model, plan, x)(x), rtol=1e-10, atol=1e-12)
    bad = dataclasses.replace(plan, kept={"attn.qkv": torch.arange(12)})  # q's first 12: Torch-Pruning would cut all 48
    with pytest.raises(PruneError, match="cutting 36 channels of attn.qkv would cut 48: Torch-Pruning ties its channels"):
        prune_graph(model, bad, x)


def test_rmsnorm_style_modules_are_recognised():
    assert is_rmsnorm(RMSNorm(4)) and is_rmsnorm(nn.RMSNorm(4)) and not is_rmsnorm(nn.LayerNorm(4))
    torch.manual_seed(0)
    model, x = Llama(norm=nn.RMSNorm).eval(), torch.randn(2, 5, 6)
    small = prune_nodes(model, 0.5, example_inputs=x, exact=False)
    assert small.norm.weight.shape == (8,) and small.norm.normalized_shape == (8,) and small(x).shape == (2, 3)


def test_the_option_is_checked_and_belongs_to_the_graph_path():
    model, x = _model("vit")
    with pytest.raises(PruneError, match="exact must be True or False, got 'no'"):
        prune_nodes(model, 0.5, example_inputs=x, exact="no")
    with pytest.raises(PruneError, match="exact: options of the graph path"):
        prune_nodes(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), 2, exact=False)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_onnx_export_of_blocks_pruned_through_norms(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from eigenprune.pruning.export import check_onnx, export_module_onnx

    model, x = _model(kind, dtype=torch.float32)
    pruned = prune_nodes(spectralize(model), 0.5, example_inputs=x, exact=False, keep_spectral=True).eval()
    path = export_module_onnx(pruned, x, tmp_path / f"{kind}.onnx")
    assert check_onnx(path, pruned, torch.randn(4, 5, 6)) < 1e-4
