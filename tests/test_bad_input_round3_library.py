"""Bad input, round 3 (issue #22, library and checkpoints): each case raises the library's own one-line error
(or, through the CLI, exits 2 with one `error:` line), quickly, and leaves its input files as they were.
Plus the exactness of the hooks that `spectralize`/`despectralize` carry over.

`python tests/test_bad_input_round3_library.py` prints the table of docs/reliability.md ("Bad input,
round 3") with the messages the program gives now.
"""

from __future__ import annotations

import json
import pickle
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from conftest import edit_safetensors_header  # noqa: E402
from eigenprune.cli import app  # noqa: E402
from eigenprune.core.convert import SpectralizeError, despectralize, spectralize  # noqa: E402
from eigenprune.core.io import OutputError  # noqa: E402
from eigenprune.core.layers import SpectralLinear  # noqa: E402
from eigenprune.core.plans import LayerPlan, make_student  # noqa: E402
from eigenprune.pruning.checkpoint import CheckpointError, load_model, save_model  # noqa: E402
from eigenprune.pruning.keep import PruneError  # noqa: E402
from eigenprune.pruning.prune import prune_nodes  # noqa: E402

export = pytest.importorskip("eigenprune.pruning.export")
pytest.importorskip("onnxruntime")
ExportError = export.ExportError
SECONDS = 20.0
"""Every case is answered within this (most take milliseconds; the first ONNX import takes a few seconds)."""


# --- models ---------------------------------------------------------------------------------------------

def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


class Encoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.enc(x))


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, i):
        return self.out(self.emb(i))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return {"y": self.a(x)}


class UsedTwice(nn.Module):
    """The same 4 -> 4 layer applied twice: pruning its outputs would also prune its inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        return self.c(torch.relu(self.a(torch.relu(self.a(x)))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        h = x + self.att(x, x, x)[0]
        return h + self.down(torch.relu(self.up(h)))


def fp16_spectral() -> nn.Sequential:
    """A float16 student whose spectral weights (lam_in - lam_out) * phi round differently in float16 than in float32."""
    model = make_student(10, [LayerPlan(6, "spectral"), LayerPlan(4, "direct", 0.0, 0.0), LayerPlan(1, "fixed", 0.0, 0.0)],
                         seed=1, dtype=torch.float16)
    with torch.no_grad():
        model[0].lam_out.copy_(torch.linspace(0.3, 2.9, 6))
    return model


def hooked(model: nn.Module, kind: str) -> nn.Module:
    getattr(model[0], kind)(lambda *a: None)
    return model


def shared_chain(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(model[0], model[1], model[2], model[3], model[2], model[3], model[4])


# --- files ----------------------------------------------------------------------------------------------

def good(d: Path) -> None:
    save_model(mlp(), d / "good.safetensors")


def edited(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        good(d)
        (d / name).write_bytes(edit_safetensors_header((d / "good.safetensors").read_bytes(), lambda h: change(h["__metadata__"])))
    return setup


def deep_arch(meta: dict) -> None:
    meta["eigenprune"] = "[" * 100_000 + "]" * 100_000


def pickled(d: Path) -> None:
    (d / "model.safetensors").write_bytes(pickle.dumps(mlp().state_dict()))


def torch_saved(d: Path) -> None:
    torch.save(mlp().state_dict(), d / "model.safetensors")


def foreign(d: Path) -> None:
    save_file({"w": torch.zeros(3)}, str(d / "model.safetensors"))


def pruned(d: Path) -> None:
    good(d)
    save_model(prune_nodes(mlp(), 3, layers=[0]), d / "pruned.safetensors")


def fp16_file(d: Path) -> None:
    save_model(fp16_spectral(), d / "half.safetensors")


def onnx_file(d: Path) -> None:
    export.export_onnx(mlp(), d / "m.onnx")


# --- the cases ------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One bad input: a Python call raising `error`, or (`cli`) eigenprune's arguments; `expect` is part of the message."""

    id: str
    show: str
    expect: str
    call: Callable[[Path], object] | None = None
    error: type[Exception] | None = None
    cli: list[str] | None = None
    setup: tuple[Callable[[Path], None], ...] = ()


X = torch.randn(5, 4)
CASES = [
    # 2. spectralize: include/exclude that match nothing, keywords
    Case("include-nope", "`spectralize(m, include=['nope'])`", "include pattern 'nope' matches no Linear or Conv layer of Sequential; "
         "its layers are: 0, 2, 4", lambda d: spectralize(mlp(), include=["nope"]), SpectralizeError),
    Case("exclude-nope", "`spectralize(m, exclude=['nope'])`", "exclude pattern 'nope' matches no Linear or Conv layer",
         lambda d: spectralize(mlp(), exclude=["nope"]), SpectralizeError),
    Case("include-container", "`spectralize(m, include=['enc'])`, `enc` a Sequential",
         "enc is a Sequential: write 'enc.*' for the layers inside it",
         lambda d: spectralize(Encoded(), include=["enc"]), SpectralizeError),
    Case("include-module", "`spectralize(m, include=[m[0]])` (a module, not a name)",
         "include entries must be module name patterns (str) or module types (e.g. nn.Linear), got a Linear",
         lambda d: spectralize(mlp(), include=[mlp()[0]]), SpectralizeError),
    Case("bad-keyword", "`spectralize(m, bogus=1)`",
         "spectralize got an unknown keyword 'bogus'; valid keywords: include, exclude, train_phi",
         lambda d: spectralize(mlp(), bogus=1), SpectralizeError),
    Case("lam-init-keyword", "`spectralize(m, lam_out_init=2.0)` (was ignored)",
         "spectralize does not take lam_out_init: an exact copy has lam_out = 1",
         lambda d: spectralize(mlp(), lam_out_init=2.0), SpectralizeError),
    Case("nan-coefficient", "`spectralize(m, l2_phi=nan)`", "spectralize: l2_phi must be a finite number >= 0, got nan",
         lambda d: spectralize(mlp(), l2_phi=float("nan")), SpectralizeError),
    Case("flag-not-bool", "`spectralize(m, train_lam_in='yes')`", "spectralize: train_lam_in must be True or False, got 'yes'",
         lambda d: spectralize(mlp(), train_lam_in="yes"), SpectralizeError),
    Case("despectralize-state-dict-hook", "`despectralize` of a layer with a state-dict hook",
         "cannot despectralize 0 (SpectralLinear): it has a state dict hook, which sees parameter names that the converted layer "
         "does not have",
         lambda d: despectralize(hooked(spectralize(mlp()), "_register_state_dict_hook")), SpectralizeError),
    # 3. export_module_onnx / export_onnx
    Case("export-dict-output", "`export_module_onnx` of a model whose forward returns a dict",
         "DictOut.forward returns a dict; export_module_onnx exports a tensor or a tuple of tensors",
         lambda d: export.export_module_onnx(DictOut(), X, d / "m.onnx"), ExportError),
    Case("export-wrong-shape", "`export_module_onnx` with example inputs [5, 3] for a 4-input model",
         "example_inputs ([5, 3] float32) do not fit Sequential: RuntimeError: mat1 and mat2 shapes cannot be multiplied",
         lambda d: export.export_module_onnx(mlp(), torch.randn(5, 3), d / "m.onnx"), ExportError),
    Case("export-rtol-nan", "`export_module_onnx(rtol=nan)`", "rtol must be a finite number >= 0 (e.g. 1e-4), got nan",
         lambda d: export.export_module_onnx(mlp(), X, d / "m.onnx", rtol=float("nan")), ExportError),
    Case("export-rtol-negative", "`export_module_onnx(rtol=-1)`", "rtol must be a finite number >= 0 (e.g. 1e-4), got -1",
         lambda d: export.export_module_onnx(mlp(), X, d / "m.onnx", rtol=-1), ExportError),
    Case("export-onnx-rtol-inf", "`export_onnx(rtol=inf)`", "rtol must be a finite number >= 0 (e.g. 1e-4), got inf",
         lambda d: export.export_onnx(mlp(), d / "m.onnx", rtol=float("inf")), ExportError),
    Case("export-fp16", "`export_onnx` of a float16 spectral MLP at the default rtol",
         "> rtol 0.0001 (the model holds float16 parameters, precise to about 0.00098: an rtol below about 0.0098 is likely out of reach",
         lambda d: export.export_onnx(fp16_spectral(), d / "m.onnx"), ExportError),
    Case("export-over-checkpoint", "`export_module_onnx(..., path=our checkpoint, overwrite=True)`",
         "pruned.safetensors exists and is not an ONNX file that eigenprune wrote; refusing to replace it",
         lambda d: export.export_module_onnx(mlp(), X, d / "pruned.safetensors", overwrite=True), OutputError, setup=(pruned,)),
    # 4. prune_nodes
    Case("prune-meta-inputs", "`prune_nodes(m, 4, example_inputs=<meta tensor>)`",
         "example_inputs[0] is on the meta device (it holds no values); pruning runs the model on real tensors",
         lambda d: prune_nodes(mlp(), 4, example_inputs=torch.empty(5, 4, device="meta")), PruneError),
    Case("prune-meta-model", "`prune_nodes` of a model on the meta device",
         "the model's 0.weight is on the meta device (it holds no values): load or initialise the weights first",
         lambda d: prune_nodes(mlp().to("meta"), 4), PruneError),
    Case("prune-graph-shared-layer", "`prune_nodes(example_inputs=x)` of a model calling one Linear twice (before: a shape error)",
         "cannot prune UsedTwice: its layer a is called 2 times in one forward pass (a shared layer)",
         lambda d: prune_nodes(UsedTwice(), 2, example_inputs=X), PruneError),
    Case("prune-chain-shared-layer", "`prune_nodes` of a chain using one Linear twice (before: pruned as two layers)",
         "Sequential uses its layer 2 twice in forward (as linear layers 1 and 2)",
         lambda d: prune_nodes(shared_chain(mlp()), 4, layers=[0, 1]), PruneError),
    Case("prune-chain-hook", "`prune_nodes` (chain path) of a model with a forward hook (before: dropped)",
         "its Linear (module 0) has a forward hook, which pruning a chain MLP would drop or feed other widths",
         lambda d: prune_nodes(hooked(mlp(), "register_forward_hook"), 4), PruneError),
    Case("prune-not-a-chain", "`prune_nodes` (chain path) of Linear -> LayerNorm -> Linear (before: TypeError)",
         "cannot read LayerNorm as part of an MLP; supported: Linear, SpectralLinear",
         lambda d: prune_nodes(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), 2), PruneError),
    Case("prune-convtranspose", "`prune_nodes` of ConvTranspose2d -> ReLU -> Conv2d",
         "0: it is a ConvTranspose2d, which cannot lose channels exactly",
         lambda d: prune_nodes(nn.Sequential(nn.ConvTranspose2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3)), 2,
                               example_inputs=torch.randn(1, 2, 6, 6)), PruneError),
    Case("prune-mha-out-proj", "`prune_nodes(keep={'att.out_proj': 4})`", "keep names 'att.out_proj', which is not a prunable layer "
         "(MultiheadAttention att reads its weight directly, never calling its forward)",
         lambda d: prune_nodes(Attention(), {"att.out_proj": 4}, example_inputs=torch.randn(2, 3, 8)), PruneError),
    # 5. checkpoints, through the Python API
    Case("load-pickle", "`load_model` of a pickle renamed .safetensors (before: header too large)",
         "model.safetensors: not a safetensors file (it starts like a pickle, e.g. of torch.save); eigenprune reads the safetensors "
         "checkpoints its save_model writes and never unpickles a file", lambda d: load_model(d / "model.safetensors"), CheckpointError,
         setup=(pickled,)),
    Case("load-torch-save", "`load_model` of a torch.save file renamed .safetensors",
         "model.safetensors: not a safetensors file (it is a zip archive, as torch.save writes)",
         lambda d: load_model(d / "model.safetensors"), CheckpointError, setup=(torch_saved,)),
    Case("load-foreign", "`load_model` of a safetensors file written by save_file",
         "model.safetensors: a safetensors file without eigenprune's architecture (no 'eigenprune' metadata); written by another tool",
         lambda d: load_model(d / "model.safetensors"), CheckpointError, setup=(foreign,)),
    # 5. through the CLI
    Case("cli-prune-no-arch", "`prune` of a checkpoint whose architecture metadata was removed "
         "(before: corrupted checkpoint ('eigenprune'))",
         "noarch.safetensors: a safetensors file without eigenprune's architecture (no 'eigenprune' metadata); "
         "it has eigenprune's format tag",
         cli=["prune", "noarch.safetensors", "--keep", "3", "--out", "p.safetensors"],
         setup=(edited("noarch.safetensors", lambda m: m.pop("eigenprune")),)),
    Case("cli-prune-deep-json", "`prune` of a checkpoint whose architecture is a 10^5-deep nested array (before: RecursionError)",
         "deep.safetensors: corrupted checkpoint (its 'eigenprune' metadata is JSON nested too deeply to read",
         cli=["prune", "deep.safetensors", "--keep", "3", "--out", "p.safetensors"], setup=(edited("deep.safetensors", deep_arch),)),
    Case("cli-export-deep-json", "`export` of that checkpoint (before: RecursionError)",
         "deep.safetensors: corrupted checkpoint (its 'eigenprune' metadata is JSON nested too deeply to read",
         cli=["export", "deep.safetensors", "--onnx", "m.onnx"], setup=(edited("deep.safetensors", deep_arch),)),
    Case("cli-prune-pickle", "`prune` of a pickle renamed .safetensors",
         "model.safetensors: not a safetensors file (it starts like a pickle",
         cli=["prune", "model.safetensors", "--keep", "3", "--out", "p.safetensors"], setup=(pickled,)),
    Case("cli-prune-out-onnx", "`prune --out x.onnx` (before: wrote safetensors under an ONNX name)",
         "--out x.onnx: this writes an eigenprune checkpoint (safetensors); give a name ending in .safetensors",
         cli=["prune", "good.safetensors", "--keep", "3", "--out", "x.onnx"], setup=(good,)),
    Case("cli-export-force-over-checkpoint", "`export --onnx pruned.safetensors --force` over our own pruned checkpoint",
         "--onnx pruned.safetensors exists and is not an ONNX file that eigenprune wrote; refusing to replace it",
         cli=["export", "good.safetensors", "--onnx", "pruned.safetensors", "--force"], setup=(pruned,)),
    Case("cli-prune-force-over-onnx", "`prune --out m.safetensors --force` where m.safetensors is really our ONNX file",
         "--out m.safetensors exists and is not an eigenprune checkpoint (safetensors) that eigenprune wrote",
         cli=["prune", "good.safetensors", "--keep", "3", "--out", "m.safetensors", "--force"],
         setup=(good, onnx_file, lambda d: (d / "m.onnx").rename(d / "m.safetensors"))),
    Case("cli-export-fp16", "`export` of a float16 spectral checkpoint at the default --rtol",
         "(the model holds float16 parameters, precise to about 0.00098: an rtol below about 0.0098 is likely out of reach; "
         "pass a larger rtol",
         cli=["export", "half.safetensors", "--onnx", "m.onnx"], setup=(fp16_file,)),
]


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _check(case: Case, d: Path, monkeypatch) -> str:
    for step in case.setup:
        step(d)
    before = tree(d)
    monkeypatch.chdir(d)
    start = time.perf_counter()
    if case.cli is not None:
        result = CliRunner().invoke(app, case.cli, prog_name="eigenprune")
        assert result.exit_code == 2, (result.exit_code, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.output and result.stdout == "", result.output
        message = result.stderr.strip()
    else:
        with pytest.raises(case.error) as err:
            case.call(d)
        assert type(err.value) is case.error, repr(err.value)  # the library's own class, not a subclass from elsewhere
        message = str(err.value)
        assert "\n" not in message and "Traceback" not in message, message
    assert time.perf_counter() - start < SECONDS
    assert case.expect in message, message
    assert tree(d) == before, "files changed"
    return message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_typed_line_and_changes_nothing(case, tmp_path, monkeypatch):
    _check(case, tmp_path, monkeypatch)


def test_the_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# --- hooks move with the layer, exactly -------------------------------------------------------------------

def test_spectralize_and_despectralize_keep_forward_and_pre_hooks_exactly():
    model = mlp().eval()
    x = torch.randn(16, 4)
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    model[2].register_forward_hook(lambda mod, args, out: out + 1)
    model[4].register_forward_pre_hook(lambda mod, args, kwargs: ((args[0] - 0.5,), kwargs), with_kwargs=True)
    want = model(x)
    spectral = spectralize(model)
    assert isinstance(spectral[0], SpectralLinear) and isinstance(spectral[4], SpectralLinear)
    torch.testing.assert_close(spectral(x), want, rtol=0, atol=0)
    assert not spectral[0].training  # the training mode came along too
    plain = despectralize(spectral)
    assert type(plain[0]) is nn.Linear
    torch.testing.assert_close(plain(x), want, rtol=0, atol=0)


def test_a_hook_handle_still_removes_the_hook_after_conversion():
    model = mlp()
    x = torch.randn(8, 4)
    handle = model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 3,))
    hooked_out, plain_out = model(x), None
    spectralize(model)
    torch.testing.assert_close(model(x), hooked_out, rtol=0, atol=0)
    handle.remove()
    plain_out = model(x)
    assert not torch.equal(plain_out, hooked_out)
    torch.testing.assert_close(plain_out, mlp()(x), rtol=0, atol=0)  # same seed: the model without the hook


def test_full_backward_hooks_see_the_same_gradients():
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "spectral": []}
    x = torch.randn(8, 4)
    for name in seen:
        model = mlp()
        model[2].register_full_backward_hook(lambda mod, gin, gout, name=name: seen[name].append(gout[0].clone()))
        if name == "spectral":
            spectralize(model)
        model(x).square().sum().backward()
    assert len(seen["plain"]) == len(seen["spectral"]) == 1
    torch.testing.assert_close(seen["spectral"][0], seen["plain"][0], rtol=1e-6, atol=1e-7)


def test_layers_whose_hooks_or_weights_cannot_move_are_left_alone_and_keep_the_function(caplog):
    model = mlp()
    x = torch.randn(8, 4)
    model[0]._register_state_dict_hook(lambda mod, sd, prefix, meta: None)
    model[2] = nn.utils.weight_norm(model[2])
    model[4].register_backward_hook(lambda mod, gin, gout: None)
    want = model(x)
    with caplog.at_level("WARNING", logger="eigenprune"):
        spectralize(model)
    assert [type(m).__name__ for m in model if not isinstance(m, nn.ReLU)] == ["Linear", "Linear", "Linear"]
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    text = caplog.text
    assert "spectralize left 0 (Linear) alone: it has a state dict hook" in text
    assert "spectralize left 2 (Linear) alone: its weight is not a parameter of its own" in text
    assert "spectralize left 4 (Linear) alone: it has a register_backward_hook hook" in text


def test_a_bare_pattern_is_one_pattern_and_an_unmatched_type_is_no_error():
    model = spectralize(Encoded(), include="enc.*")  # before: iterated as the patterns 'e', 'n', 'c', '.', '*'
    assert isinstance(model.enc[0], SpectralLinear) and type(model.head) is nn.Linear
    spectralize(mlp(), include=[nn.Conv2d])  # a type may match nothing (generic code): converts nothing, no error


# --- exports that now work -----------------------------------------------------------------------------------

def test_export_of_an_embedding_model_feeds_int64_indices(tmp_path):
    model = Embedded().eval()
    idx = torch.randint(0, 10, (3, 5))
    path = export.export_module_onnx(model, idx, tmp_path / "e.onnx")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(int64)"
    got = torch.from_numpy(session.run(None, {"x0": idx.numpy()})[0])
    torch.testing.assert_close(got, model(idx).detach(), rtol=1e-5, atol=1e-6)


def test_export_of_a_data_parallel_model_is_its_module(tmp_path):
    model = mlp().eval()
    path = export.export_module_onnx(nn.DataParallel(model), X, tmp_path / "dp.onnx")
    assert export.check_onnx(path, model, torch.randn(7, 4)) < 1e-4


def test_export_of_float16_passes_at_a_tolerance_suited_to_it(tmp_path):
    model = fp16_spectral()
    path, diff = export.export_onnx(model, tmp_path / "h.onnx", rtol=1e-2)
    assert path.exists() and 1e-4 < diff < 1e-2  # what the default 1e-4 refused, with the hint


def test_load_model_reads_what_save_model_writes_after_the_new_checks(tmp_path):
    model = mlp()
    loaded, extra = load_model(save_model(model, tmp_path / "m.safetensors", {"a": 1}))
    x = torch.randn(4, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert extra == {"a": 1} and json.loads(json.dumps(extra)) == extra


# --- the docs table ---------------------------------------------------------------------------------------

def _table() -> str:
    import _pytest.monkeypatch

    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            d = Path(tmp) / f"case{i}"
            d.mkdir()
            mp = _pytest.monkeypatch.MonkeyPatch()
            try:
                message = _check(case, d, mp).replace(str(d), "…").replace("|", "\\|")
            finally:
                mp.undo()
            lines.append(f"| {case.show.replace('|', chr(92) + '|')} | `{message}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table())
