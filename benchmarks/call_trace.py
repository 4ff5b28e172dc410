"""How often following one value through eigenprune enters each module (issue 23's "visits each module once or twice").

    PYTHONPATH=src python benchmarks/call_trace.py            # all three paths
    PYTHONPATH=src python benchmarks/call_trace.py run chain  # some of them

Paths: `run` (`eigenprune run` on the quick config with a tiny grid, in this process, report included:
the value followed is the `Config`, copies such as `cfg.for_teacher(t)` too), `chain` and `graph`
(`prune_nodes` on a small spectralized MLP of the user's own class, without and with `example_inputs`: the
value followed is the model in any of its forms, a module that holds layers: the user's model, its copies, its
chain view `as_sequential`, the pruned result; single layers are not followed).

A profile hook (`sys.setprofile`) sees every Python call. A call into an eigenprune function that receives
the followed value as an argument (besides `self`: the value's own methods, `cfg.method(...)`, do not
count), from a function of another eigenprune module (the nearest eigenprune frame up the stack; the
user's code counts as a module of its own), is an *entry* into the callee's module.
Per module the table shows:

  visits     distinct entry edges (caller function -> callee function): what the code does, however
             many chunks, teachers or layers the loops go over; the issue's number
  calls      entries as they happened (loops multiply them)
  callbacks  distinct entry edges from a lower layer (core < pruning < batched < experiments < reporting
             < cli; the user's code is the top): a lower layer handing the value back up
  functions  the functions of the module that received the value

`--edges` lists every entry edge as well; `--all` counts every call between eigenprune's modules, whatever
it carries (where the code goes back and forth, not only the followed value).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

LAYERS = ("core", "pruning", "batched", "experiments", "reporting", "cli")


class Tracer:
    """Records the entries into eigenprune's modules of calls that receive a followed value."""

    def __init__(self, follow) -> None:
        import eigenprune

        self.root = str(Path(eigenprune.__file__).parent) + os.sep
        self.follow = follow  # value -> whether it is (a form of) the value followed
        self.modules: dict[object, str | None] = {}  # code object -> module path under src/eigenprune, or None
        self.edges: Counter[tuple[str, str]] = Counter()  # (caller 'module:function', callee 'module:function') -> calls

    def module(self, code) -> str | None:
        m = self.modules.get(code, False)
        if m is False:
            f = code.co_filename
            m = f[len(self.root):].replace(os.sep, "/") if f.startswith(self.root) else None
            self.modules[code] = m
        return m

    def __call__(self, frame, event, arg) -> None:
        if event != "call":
            return
        code = frame.f_code
        callee = self.module(code)
        if callee is None:
            return
        if self.follow is not None:
            n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)
            names = code.co_varnames[:n]
            if names[:1] == ("self",):  # the value's own methods (cfg.method(...)) are not an entry: it asks itself
                names = names[1:]
            local = frame.f_locals
            if not any(self._holds(local.get(name)) for name in names):
                return
        up = frame.f_back
        while up is not None and self.module(up.f_code) is None:
            up = up.f_back
        caller = self.module(up.f_code) if up is not None else "<user>"
        if caller != callee:
            where = f"{caller}:{up.f_code.co_qualname}" if up is not None else "<user>"
            self.edges[(where, f"{callee}:{code.co_qualname}")] += 1

    def _holds(self, value) -> bool:
        if self.follow(value):
            return True
        if isinstance(value, (list, tuple)) and value and len(value) < 8:  # e.g. (cfg, chunk) or [model]
            return any(self.follow(v) for v in value)
        return False

    def trace(self, fn) -> object:
        sys.setprofile(self)
        try:
            return fn()
        finally:
            sys.setprofile(None)


def layer(module: str) -> int:
    """The place of a module in the one-way import order (the user's code above everything)."""
    if module == "<user>":
        return len(LAYERS)
    top = module.split("/")[0].removesuffix(".py")
    return LAYERS.index(top) if top in LAYERS else len(LAYERS) - 1


def table(edges: Counter[tuple[str, str]]) -> list[tuple[str, int, int, int, int]]:
    """(module, visits, calls, callbacks, functions) per entered module, most visited first."""
    visits, calls, back, funcs = Counter(), Counter(), Counter(), defaultdict(set)
    for (caller, callee), n in edges.items():
        mod = callee.split(":")[0]
        visits[mod] += 1
        calls[mod] += n
        funcs[mod].add(callee)
        if layer(caller.split(":")[0]) < layer(mod):
            back[mod] += 1
    return sorted(((m, visits[m], calls[m], back[m], len(funcs[m])) for m in visits), key=lambda r: (-r[1], r[0]))


def show(title: str, edges: Counter[tuple[str, str]], list_edges: bool) -> None:
    rows = table(edges)
    print(f"\n## {title}: {sum(r[1] for r in rows)} entry edges into {len(rows)} modules")
    print(f"{'module':32} {'visits':>6} {'calls':>6} {'callbacks':>9} {'functions':>9}")
    for mod, v, c, b, f in rows:
        print(f"{mod:32} {v:6} {c:6} {b:9} {f:9}")
    if list_edges:
        for (caller, callee), n in sorted(edges.items()):
            print(f"    {caller} -> {callee}  x{n}")


TINY = ["trials=1", "student.widths=[4,8]", "data.n_train=200", "data.n_test=100", "spectral.epochs=2", "direct.epochs=2",
        "analysis.probe_kept=[2]"]
"""`eigenprune run`'s quick config made tiny: every step of the run happens, in a second or two of training."""


def trace_run(every: bool = False) -> Counter:
    from eigenprune.cli import app
    from eigenprune.experiments.config import Config

    out = Path(tempfile.mkdtemp()) / "run"
    args = ["run", "--out", str(out), "--quiet", "--workers", "1", *(a for s in TINY for a in ("--set", s))]
    tracer = Tracer(None if every else lambda v: isinstance(v, Config))
    code = tracer.trace(lambda: app(args, standalone_mode=False))
    if code not in (0, None):
        raise SystemExit(f"eigenprune run failed (exit {code})")
    return tracer.edges


def _user_mlp():
    import torch
    from torch import nn

    class UserMLP(nn.Module):
        """A user's own chain-shaped MLP (not an nn.Sequential): 6 -> 16 -> 12 -> 3."""

        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

        def forward(self, x):
            return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    torch.manual_seed(0)
    return UserMLP()


def trace_prune(graph: bool, every: bool = False) -> Counter:
    import torch
    from torch import nn

    from eigenprune import prune_nodes, spectralize

    model = spectralize(_user_mlp())
    tracer = Tracer(None if every else lambda v: isinstance(v, nn.Module) and next(v.children(), None) is not None)
    if graph:
        tracer.trace(lambda: prune_nodes(model, {"fc1": 8, "fc2": 6}, example_inputs=torch.randn(2, 6)))
    else:
        tracer.trace(lambda: prune_nodes(model, {0: 8, 1: 6}))
    return tracer.edges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", metavar="PATH", help="run, chain, graph (default: all three)")
    ap.add_argument("--edges", action="store_true", help="list every entry edge")
    ap.add_argument("--all", action="store_true", help="count every call between eigenprune's modules, whatever it carries")
    args = ap.parse_args()
    if unknown := set(args.paths) - {"run", "chain", "graph"}:
        ap.error(f"unknown path(s) {', '.join(sorted(unknown))}; choose from run, chain, graph")
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp())
    import torch

    torch.set_num_threads(1)
    for path in args.paths or ["run", "chain", "graph"]:
        if path == "run":
            what = "every call" if args.all else "following the Config"
            show(f"eigenprune run (quick config, tiny grid), {what}", trace_run(args.all), args.edges)
        else:
            what = "every call" if args.all else "following the user's model"
            show(f"prune_nodes, {path} path, {what}", trace_prune(path == "graph", args.all), args.edges)


if __name__ == "__main__":
    main()
