"""Pruning any graph through Torch-Pruning: pruned == masked on every model kind, our Importance in TP's own pruner, ONNX."""

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from eigenprune import SpectralLinear, node_importance, prune_nodes, spectralize
from eigenprune.core.layers import SpectralConv2d, SpectralConv3d, SpectralModule
from eigenprune.pruning.graph import ROOT_TYPES, SPECTRAL_PRUNERS, EigenImportance, mask_graph, prune_graph, select_channels
from eigenprune.pruning.keep import PruneError
from real_models import CNN, MODELS, ResMLP, TinyTransformer, _randomize, _settle


def _spectral(kind, seed=0):
    torch.manual_seed(seed)
    cls, shape = MODELS[kind]
    model = spectralize(_settle(cls()).double(), train_lam_in=True)
    for m in model.modules():
        if isinstance(m, SpectralModule):
            _randomize(m, seed)
    return model.eval(), torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("keep_spectral", [True, False])
def test_pruned_equals_masked_on_every_model_kind(kind, keep_spectral):
    model, x = _spectral(kind)
    before = copy.deepcopy(model.state_dict())
    plan = select_channels(model, 0.5, x)
    assert plan.kept, plan
    pruned = prune_graph(model, plan, x, keep_spectral=keep_spectral)
    masked = mask_graph(model, plan, x)
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(masked(x), model(x))  # the pruning did something
    n_before, n_after = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in pruned.parameters())
    assert n_after < n_before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    has_spectral = any(isinstance(m, SpectralModule) for m in pruned.modules())
    assert has_spectral == keep_spectral


def test_which_groups_are_pruned_and_which_left_alone():
    model, x = _spectral("cnn")
    plan = select_channels(model, 4, x)
    assert set(plan.kept) == {"c2", "c3"}  # c1 and c2 share channels through the residual sum: one group
    assert plan.members == {"c1": "c2", "c2": "c2", "c3": "c3"}
    assert plan.left_alone == {"head": "its channels are model outputs"}
    model, x = _spectral("transformer")
    plan = select_channels(model, 4, x)
    assert set(plan.kept) == {"encoder.linear1"}  # the MLP inside the encoder layer
    assert "LayerNorm" in plan.left_alone["embed"] or "MultiheadAttention" in plan.left_alone["embed"]
    resmlp = ResMLP(norm="layer").double().eval()
    plan = select_channels(resmlp, 4, torch.randn(3, 6, dtype=torch.float64))
    assert set(plan.kept) == {"blocks.0.1", "blocks.1.1"} and "LayerNorm" in plan.left_alone["inp"]


def test_the_default_ranking_is_node_importance():
    model, x = _spectral("transformer")
    plan = select_channels(model, 5, x)
    scores = node_importance(model.encoder.linear1)
    assert plan.kept["encoder.linear1"].tolist() == sorted(scores.argsort(descending=True)[:5].tolist())
    model, x = _spectral("cnn")  # a residual group: the norm of both producing layers' incoming weights, after BatchNorm
    plan = select_channels(model, 3, x)

    def folded(conv, bn):
        return node_importance(conv) * bn.weight.abs().detach() / (bn.running_var + bn.eps).sqrt()

    both = (folded(model.c1, model.bn1).square() + folded(model.c2, model.bn2).square()).sqrt()
    assert not torch.equal(both.argsort(), (node_importance(model.c1).square() + node_importance(model.c2).square()).argsort())
    assert plan.kept["c2"].tolist() == sorted(both.argsort(descending=True)[:3].tolist())


def test_the_outgoing_side_ranks_by_the_reading_layers_columns():
    model, x = _spectral("transformer")
    incoming = node_importance(model.encoder.linear1).double()
    outgoing = model.encoder.linear2.weight.detach().double().norm(dim=0)  # column i: how linear2 reads neuron i
    assert not torch.equal(incoming.argsort(), outgoing.argsort())
    for side, expected in (("out", outgoing), ("both", incoming * outgoing)):
        plan = select_channels(model, 5, x, importance=EigenImportance(side=side))
        torch.testing.assert_close(plan.scores["encoder.linear1"], expected)
        assert plan.kept["encoder.linear1"].tolist() == sorted(expected.argsort(descending=True)[:5].tolist())
    model, x = _spectral("cnn")  # a flattening dense layer reads each channel at several positions: all its columns count
    scores = select_channels(model, 3, x, importance=EigenImportance(side="out")).scores["c3"]
    per_channel = model.head.weight.detach().double().view(10, 6, 6).square().sum((0, 2)).sqrt()  # [10, 6 channels x 6]
    torch.testing.assert_close(scores, per_channel)
    with pytest.raises(PruneError, match="side must be one of in, out, both, got 'down'"):
        EigenImportance(side="down")


def test_per_layer_keep_global_ranking_and_ignored_layers():
    model, x = _spectral("cnn")
    small = prune_nodes(model, {"c1": 3}, example_inputs=x, keep_spectral=True)
    assert small.c1.out_channels == small.c2.out_channels == 3 and small.c3.out_channels == 6
    assert isinstance(small.c1, SpectralConv2d) and small.c1.phi.shape == (3, 1, 3, 3) and small.c2.lam_in.shape == (3,)
    assert prune_nodes(model, 2, example_inputs=x, ignored_layers=[model.c3]).c3.out_channels == 6
    assert prune_nodes(model, 2, example_inputs=x, ignored_layers=["c1"]).c1.out_channels == 8
    glob = select_channels(model, 0.5, x, global_ranking=True)
    assert sum(len(v) for v in glob.kept.values()) == 7  # half of the 8 + 6 prunable channels
    assert all(len(v) >= 1 for v in glob.kept.values())


def test_keep_spectral_trains_on_after_pruning():
    model, x = _spectral("resmlp")
    small = prune_nodes(model, 0.5, example_inputs=x, keep_spectral=True).train()
    opt = torch.optim.SGD(small.parameters(), lr=0.01)
    loss = small(x).square().mean()
    loss.backward()
    opt.step()
    assert small.blocks[0][1].lam_in.grad is not None and small(x).square().mean() < loss


def test_inplace_only_when_asked():
    model, x = _spectral("cnn")
    out = prune_nodes(model, 2, example_inputs=x)
    assert model.c1.out_channels == 8 and out.c1.out_channels == 2
    same = prune_nodes(model, 2, example_inputs=x, inplace=True, keep_spectral=True)
    assert same is model and model.c1.out_channels == 2


def test_torch_pruning_own_pruner_with_our_importance_keeps_the_same_channels():
    model, x = _spectral("cnn")
    ours = prune_nodes(model, 0.5, example_inputs=x, keep_spectral=True)
    theirs = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(theirs, x, importance=EigenImportance(), pruning_ratio=0.5, ignored_layers=[theirs.head],
                                  customized_pruners=SPECTRAL_PRUNERS, root_module_types=ROOT_TYPES)
    pruner.step()
    assert ours.c1.out_channels == theirs.c1.out_channels == 4 and ours.c3.out_channels == theirs.c3.out_channels == 3
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), name

    torch.manual_seed(1)  # a chain MLP without biases: the chain path and TP's pruner give the same model
    mlp = spectralize(nn.Sequential(nn.Linear(5, 10, bias=False), nn.ReLU(), nn.Linear(10, 8, bias=False), nn.Tanh(),
                                    nn.Linear(8, 1, bias=False)))
    chain = prune_nodes(mlp, 0.5)
    theirs = copy.deepcopy(mlp)
    tp.pruner.MetaPruner(theirs, torch.randn(2, 5), importance=EigenImportance(), pruning_ratio=0.5, ignored_layers=[theirs[4]],
                         customized_pruners=SPECTRAL_PRUNERS, root_module_types=ROOT_TYPES).step()
    for i in (0, 2, 4):
        torch.testing.assert_close(chain[i].weight, theirs[i].weight, rtol=0, atol=0)


def test_prune_nodes_of_a_conv3d_net_equals_the_masked_one():
    """A layer type added in one class (SpectralConv3d) goes through the whole graph path: ranked, pruned, exact."""
    model, x = _spectral("cnn3d")
    plan = select_channels(model, 3, x)
    assert set(plan.kept) == {"c1", "c2"} and plan.left_alone == {"head": "its channels are model outputs"}
    for keep_spectral in (True, False):
        small = prune_nodes(model, 3, example_inputs=x, keep_spectral=keep_spectral)
        assert small.c1.out_channels == small.c2.out_channels == 3 and small.bn.num_features == 3
        assert type(small.c1) is (SpectralConv3d if keep_spectral else nn.Conv3d)
        torch.testing.assert_close(small(x), mask_graph(model, plan, x)(x), rtol=1e-10, atol=1e-12)
    scores = node_importance(model.c2)  # the default ranking: node_importance (no BatchNorm after c2)
    assert plan.kept["c2"].tolist() == sorted(scores.argsort(descending=True)[:3].tolist())
    assert not torch.allclose(small(x), model(x))


def test_torch_pruning_sees_spectral_layers():
    model, x = _spectral("cnn")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, customized_pruners=SPECTRAL_PRUNERS)
    assert not dg.unwrapped_parameters and model.c1 in dg.module2node and model.head in dg.module2node


# --- bad input: one line, the model untouched -------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


class MatParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            return self.a(x)


def test_bad_input_is_one_line_and_leaves_the_model_alone():
    model, x = _spectral("cnn")
    before = copy.deepcopy(model.state_dict())
    cases = [
        (dict(keep=2, example_inputs=torch.randn(4, 3, 8, 8, dtype=torch.float64)),
         r"^example_inputs of shape \[4, 3, 8, 8\] do not fit CNN: RuntimeError: "),
        (dict(keep=0), r"^keep must be a count >= 1"),
        (dict(keep="0%"), r"^keep must be a count >= 1"),
        (dict(keep={"c1": 9}), r"^keep=9 exceeds the width 8 of c2; give a count in 1..8$"),
        (dict(keep={"head": 2}), r"^keep names 'head', which is not a prunable layer \(its channels are model outputs\)"),
        (dict(keep="auto"), r"^keep='auto' is for chain MLPs"),
        (dict(keep=2, ignored_layers=["nope"]), r"^ignored_layers entry 'nope' is not a module of CNN"),
        (dict(keep=2, layers=[0]), r"^with example_inputs, choose layers by name.*; layers: options of the chain path$"),
        (dict(keep=2, rtol=0.1, task="regression"), r"; rtol, task: options of the chain path$"),  # once ignored in silence
    ]
    for kwargs, pattern in cases:
        kwargs.setdefault("example_inputs", x)
        with pytest.raises(PruneError, match=pattern) as err:
            prune_nodes(model, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(PruneError, match=r"^keep_spectral: options of the graph path; pass example_inputs"):
        prune_nodes(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), 2, keep_spectral=True)
    with pytest.raises(PruneError, match=r"^importance, inplace: options of the graph path; pass example_inputs"):
        prune_nodes(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), 2, importance=EigenImportance(), inplace=False)
    with pytest.raises(PruneError, match=r"^unwrapped_parameters entry 'nope' is not a parameter of Sequential"):
        prune_nodes(nn.Sequential(nn.Linear(4, 4), Scaled(), nn.Linear(4, 1)), 2, example_inputs=torch.randn(2, 4),
                    unwrapped_parameters=[("nope", 0)])
    with pytest.raises(PruneError, match=r"^unwrapped_parameters: the dim of 1.scale must be an int in -1..0 \(its shape is \[4\]\); "
                                         r"got 3$"):
        prune_nodes(nn.Sequential(nn.Linear(4, 4), Scaled(), nn.Linear(4, 1)), 2, example_inputs=torch.randn(2, 4),
                    unwrapped_parameters=[("1.scale", 3)])
    with pytest.raises(PruneError, match=r"^cannot trace NoGrad: its output on example_inputs has no autograd graph"):
        prune_nodes(NoGrad(), 2, example_inputs=torch.randn(2, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.c1.out_channels == 8


def test_a_bare_parameter_is_cut_with_its_channels_or_its_group_left_alone():
    """A parameter outside any layer (a layer scale) is sliced with the channels it scales (Torch-Pruning's unwrapped
    parameters), exactly; one read by a matrix product leaves its group alone; none is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), Scaled(), nn.Linear(4, 1))
    with torch.no_grad():
        model[3].scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 4)
    for unwrapped in (None, [(model[3].scale, 0)], [("3.scale", -1)]):
        plan = select_channels(model, 2, x, unwrapped_parameters=unwrapped)
        assert plan.members == {"0": "0", "2": "2"}
        small = prune_graph(model, plan, x)
        assert small[3].scale.shape == (2,) and small[2].out_features == 2
        torch.testing.assert_close(small(x), mask_graph(model, plan, x)(x), rtol=0, atol=1e-6)
    assert prune_nodes(model, 3, example_inputs=x, ignored_layers=["3"])[2].out_features == 4
    plan = select_channels(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), MatParam(), nn.Linear(4, 1)), 2, x)
    assert plan.left_alone["2"].startswith("it shares channels with 3.w, which is a parameter read by MmBackward0, which "
                                           "cannot lose channels exactly")


# --- ONNX ------------------------------------------------------------------------------------------------


def test_onnx_round_trip_of_a_pruned_cnn(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from eigenprune.core.io import OutputError
    from eigenprune.pruning.export import ExportError, check_onnx, export_module_onnx

    torch.manual_seed(0)
    model = spectralize(_settle(CNN())).eval()
    x = torch.randn(4, 1, 8, 8)
    pruned = prune_nodes(model, 0.5, example_inputs=x, keep_spectral=True).eval()
    path = export_module_onnx(pruned, x, tmp_path / "cnn.onnx", rtol=1e-4)
    other = torch.randn(7, 1, 8, 8)  # another batch size: the batch dimension is dynamic
    assert check_onnx(path, pruned, other, rtol=1e-4) < 1e-4
    assert any(isinstance(m, SpectralModule) for m in pruned.modules())  # exporting did not touch the model
    with pytest.raises(OutputError, match="already exists"):
        export_module_onnx(pruned, x, path)
    assert export_module_onnx(pruned, x, path, overwrite=True) == path  # ours: may be replaced when asked
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"not eigenprune's")
    with pytest.raises(OutputError, match="is not an ONNX file that eigenprune wrote; refusing to replace it"):
        export_module_onnx(pruned, x, mine, overwrite=True)
    assert mine.read_bytes() == b"not eigenprune's"
    with pytest.raises(ExportError, match="not finite"):
        check_onnx(path, pruned, torch.full((2, 1, 8, 8), float("nan")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx", "mine.onnx"]


def test_a_spectral_linear_is_in_the_graph_of_a_transformer_mlp():
    model = spectralize(TinyTransformer())
    assert isinstance(model.encoder.linear1, SpectralLinear)


def test_pruning_a_model_in_training_mode_keeps_its_mode_and_batchnorm_statistics():
    model, x = _spectral("cnn")
    model.train()
    plan = select_channels(model, 4, x)
    pruned = prune_graph(model, plan, x, keep_spectral=True)
    assert pruned.training and model.training
    kept = plan.kept["c2"]
    assert torch.equal(pruned.bn1.running_mean, model.bn1.running_mean[kept])
    assert torch.equal(pruned.bn2.running_var, model.bn2.running_var[kept])


def test_choose_channels_re_decides_from_the_stored_scores():
    from eigenprune.pruning.graph import choose_channels

    model, x = _spectral("cnn")
    plan = select_channels(model, 1.0, x)
    assert all(len(plan.kept[n]) == plan.widths[n] for n in plan.kept)
    for keep in (3, 0.5, ">0.5"):
        assert {n: v.tolist() for n, v in choose_channels(plan, keep).kept.items()} == \
               {n: v.tolist() for n, v in select_channels(model, keep, x).kept.items()}
    glob = choose_channels(plan, 5, global_ranking=True)
    assert sum(len(v) for v in glob.kept.values()) == 5
    with pytest.raises(PruneError, match="global keep=1 must be between the number of groups 2"):
        choose_channels(plan, 1, global_ranking=True)


def test_onnx_round_trip_of_a_pruned_transformer(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from eigenprune.pruning.export import check_onnx, export_module_onnx

    torch.manual_seed(0)
    model = spectralize(TinyTransformer()).eval()
    x = torch.randn(3, 8, 8)
    pruned = prune_nodes(model, 0.25, example_inputs=x).eval()
    assert pruned.encoder.linear1.out_features == 6
    path = export_module_onnx(pruned, x, tmp_path / "tr.onnx")
    assert check_onnx(path, pruned, torch.randn(5, 8, 8)) < 1e-4


def test_the_graph_path_refuses_a_diverged_model_or_nan_inputs():
    model = spectralize(CNN()).eval()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(PruneError, match="example_inputs\\[0\\] holds"):
        prune_nodes(model, 0.5, example_inputs=torch.full_like(x, float("nan")))
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, SpectralModule)).phi[0, 0] = float("inf")
    with pytest.raises(PruneError, match="NaN/inf"):
        prune_nodes(model, 0.5, example_inputs=x)


# --- one trace, at most one copy (issue #24 item 5; the times are in benchmarks/bench_prune_speed.py) ---------


def _count_traces_and_copies(monkeypatch, model):
    """Counters of `model`'s forward calls (its copies share the hook) and of graph.py's deep copies."""
    import types

    from eigenprune.pruning import graph

    counts = {"forward": 0, "copy": 0}
    model.register_forward_pre_hook(lambda m, args: counts.__setitem__("forward", counts["forward"] + 1))

    def deepcopy(obj, *args):
        counts["copy"] += 1
        return copy.deepcopy(obj, *args)

    monkeypatch.setattr(graph, "copy", types.SimpleNamespace(deepcopy=deepcopy))
    return counts


@pytest.mark.parametrize("how", ["default", "inplace", "select", "plan", "mask"])
def test_one_call_runs_one_forward_and_copies_at_most_once(monkeypatch, how):
    model, x = _spectral("cnn")
    plan = select_channels(model, 0.5, x)
    counts = _count_traces_and_copies(monkeypatch, model)
    calls = {"default": lambda: prune_nodes(model, 0.5, example_inputs=x),
             "inplace": lambda: prune_nodes(model, 0.5, example_inputs=x, inplace=True),
             "select": lambda: select_channels(model, 0.5, x),
             "plan": lambda: prune_graph(model, plan, x),
             "mask": lambda: mask_graph(model, plan, x)}
    calls[how]()
    assert counts == {"forward": 1, "copy": 0 if how == "inplace" else 1}


def test_inplace_refusals_leave_the_model_and_its_mode_alone():
    model, x = _spectral("cnn")
    model.train()
    before = copy.deepcopy(model.state_dict())
    for kwargs, pattern in [(dict(keep=0), "keep must be a count"), (dict(keep={"head": 2}), "not a prunable layer"),
                            (dict(keep=2, example_inputs=torch.randn(4, 3, 8, 8, dtype=torch.float64)), "do not fit CNN")]:
        kwargs.setdefault("example_inputs", x)
        with pytest.raises(PruneError, match=pattern):
            prune_nodes(model, inplace=True, **kwargs)
        assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.c1.out_channels == 8


def test_pruning_under_no_grad_traces_with_grad_on():
    model, x = _spectral("cnn")
    with torch.no_grad():
        pruned = prune_nodes(model, 2, example_inputs=x)
    assert pruned.c1.out_channels == 2


def test_a_gradient_importance_reads_the_models_gradients_and_the_copy_keeps_none():
    torch.manual_seed(0)
    model = CNN().double().eval()
    x = torch.randn(4, *MODELS["cnn"][1][1:], dtype=torch.float64)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    plan = select_channels(model, 0.5, x, importance=tp.importance.TaylorImportance())
    eigen = select_channels(model, 0.5, x)
    assert any(not torch.equal(plan.kept[n], eigen.kept[n]) for n in plan.kept)  # the gradients changed the ranking
    pruned = prune_nodes(model, 0.5, example_inputs=x, importance=tp.importance.TaylorImportance(), keep_spectral=True)
    torch.testing.assert_close(pruned(x), prune_graph(model, plan, x, keep_spectral=True)(x))
    assert all(p.grad is None for p in pruned.parameters())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_the_finite_check_tells_an_overflowing_sum_from_a_nan():
    from eigenprune.pruning.keep import check_finite

    big = nn.Linear(4, 4)
    with torch.no_grad():
        big.weight.fill_(3e38)  # finite, though its sum overflows
    check_finite(big)
    with torch.no_grad():
        big.weight[0, 0], big.weight[0, 1] = float("inf"), -float("inf")
    with pytest.raises(PruneError, match="the model's weight holds 2 NaN/inf"):
        check_finite(big)
