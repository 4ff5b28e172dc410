"""The library stands apart from the runner, and each piece of math has one home that the others agree with."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import eigenprune
import eigenprune.core
import eigenprune.pruning
from eigenprune.batched.curves import pruning_curves
from eigenprune.batched.ensemble import Ensemble
from eigenprune.batched.train import evaluate
from eigenprune.core.layers import SpectralLinear
from eigenprune.core.losses import task_loss, task_loss_and_grad
from eigenprune.core.plans import LayerPlan, make_student
from eigenprune.pruning.chain import mask_nodes
from eigenprune.pruning.keep import top_k_mask


def test_import_eigenprune_loads_the_library_alone():
    heavy = ["pandas", "matplotlib", "typer", "pydantic", "rich", "scipy", "sklearn", "ray", "yaml",
             "eigenprune.experiments", "eigenprune.reporting", "eigenprune.batched", "eigenprune.cli"]
    code = ("import sys, eigenprune; m = eigenprune.SpectralLinear(3, 2); eigenprune.prune_nodes; "
            f"print([h for h in {heavy!r} if h in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import eigenprune loaded {out}"


def test_the_runner_is_reached_only_on_demand():
    code = ("import sys, eigenprune; from eigenprune.experiments.builders import make_teacher; make_teacher(3, [4], 0); "
            "print('eigenprune.experiments' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


@pytest.mark.parametrize("face", [eigenprune, eigenprune.core, eigenprune.pruning])
def test_each_face_exports_what_its_all_lists_and_not_the_runner(face):
    assert face.__all__ == sorted(face.__all__, key=lambda n: (not n.isupper(), not n[0].isupper(), n))  # ruff's order
    assert all(hasattr(face, name) for name in face.__all__)
    assert not {"make_teacher", "make_student", "LayerPlan"} & set(eigenprune.__all__)  # the runner's builders stay out
    assert eigenprune.prune_nodes is eigenprune.pruning.prune_nodes and eigenprune.SpectralConv3d is eigenprune.core.SpectralConv3d


def test_the_docs_import_from_the_faces_never_three_levels_deep():
    root = Path(__file__).parents[1]
    deep = re.compile(r"^\s*from eigenprune\.\w+\.\w+ import", re.M)
    found = [f"{p.relative_to(root)}: {m.group(0).strip()}" for p in [root / "README.md", *sorted((root / "docs").glob("*.md")),
                                                                    *sorted((root / "examples").glob("*.py"))]
             for m in deep.finditer(p.read_text())]
    assert found == []


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_loss_gradient_is_autograds(task):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 7, 1 if task == "regression" else 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 7, generator=g, dtype=torch.float64) if task == "regression" else torch.randint(0, 4, (3, 7), generator=g)
    loss, grad = task_loss_and_grad(out.detach(), y, task)
    torch.testing.assert_close(loss, task_loss(out, y, task).detach(), rtol=0, atol=0)
    (want,) = torch.autograd.grad(task_loss(out, y, task).sum(), out)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-14)
    if task == "classification":  # the same cross-entropy torch computes
        ref = nn.functional.cross_entropy(out.detach().reshape(-1, 4), y.reshape(-1), reduction="none").view(3, 7).mean(-1)
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


def test_the_ensemble_refuses_an_activation_it_would_not_compute():
    student = nn.Sequential(SpectralLinear(3, 4), nn.Tanh(), SpectralLinear(4, 1))
    with pytest.raises(ValueError, match="student 0 has Tanh at position 1 where ReLU belongs"):
        Ensemble([student])
    with pytest.raises(ValueError, match="ends with an activation"):
        Ensemble([nn.Sequential(SpectralLinear(3, 4), nn.ReLU())])


def _biased_students(dtype=torch.float64):
    plans = [LayerPlan(6, "spectral", bias=True), LayerPlan(4, "direct", bias=True), LayerPlan(1, "direct", bias=True)]
    students = [make_student(3, plans, seed, dtype) for seed in (0, 1)]
    g = torch.Generator().manual_seed(3)
    for s in students:
        for m in s:
            if isinstance(m, SpectralLinear):
                with torch.no_grad():
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=dtype))
    return students


def test_removing_a_node_means_one_thing_everywhere_even_with_biases():
    """The ensemble's kept-mask, the prefix-sum curves and `mask_nodes` (incoming weights zeroed) agree."""
    students = _biased_students()
    ens = Ensemble(students)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 50, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 50, generator=g, dtype=torch.float64)
    ti = torch.tensor([0, 1])
    scores = torch.rand(2, 6, generator=g, dtype=torch.float64)
    curves = pruning_curves(ens, 0, scores, x, y, ti, "regression")
    for k in (1, 3, 6):
        mask = top_k_mask(scores, k)
        masked = evaluate(ens, x, y, ti, "regression", kept={0: mask})
        torch.testing.assert_close(curves[:, k - 1], masked, rtol=1e-10, atol=1e-12)
        for s, student in enumerate(students):
            reference = mask_nodes(student, {0: mask[s].nonzero().flatten()})
            with torch.no_grad():
                want = task_loss(reference(x[s]), y[s], "regression")
            torch.testing.assert_close(masked[s], want, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(curves[:, 0], curves[:, -1])  # removing nodes changed something: the test can fail


def test_every_error_class_of_eigenprune_has_the_one_base():
    """One base (`EigenpruneError`), caught in one place by the command line: every error class the package defines has it."""
    import importlib
    import inspect

    from eigenprune import EigenpruneError

    root = Path(eigenprune.__file__).parent
    names = [".".join(p.relative_to(root.parent).with_suffix("").parts) for p in root.rglob("*.py") if p.name != "__main__.py"]
    errors = {f"{m}.{name}": cls for m in names for name, cls in vars(importlib.import_module(m)).items()
              if inspect.isclass(cls) and issubclass(cls, Exception) and not issubclass(cls, Warning)  # a warning is no error
              and cls.__module__ == m and "yaml" not in str(cls.__mro__)}
    assert len(errors) >= 10 and [n for n, c in errors.items() if not issubclass(c, EigenpruneError)] == []
