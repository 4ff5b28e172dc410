"""benchmarks/call_trace.py: following a value through eigenprune, module by module (issue 23's measure), and the
pruning paths' answer to it: each module entered from one or two places."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_tracer_counts_entries_from_other_modules_once_per_edge():
    from call_trace import Tracer, table

    from eigenprune.core.structure import check_hidden_layer

    followed = Tracer(lambda v: isinstance(v, str))  # follows strings: no call below carries one
    followed.trace(lambda: [check_hidden_layer(0, 2) for _ in range(3)])
    assert followed.edges == {}
    every = Tracer(None)
    every.trace(lambda: [check_hidden_layer(0, 2) for _ in range(3)])
    assert every.edges == {("<user>", "core/structure.py:check_hidden_layer"): 3}
    assert table(every.edges) == [("core/structure.py", 1, 3, 0, 1)]  # one visit (edge), three calls, no callback


def test_prune_nodes_enters_each_module_from_at_most_two_places():
    from call_trace import table, trace_prune

    for graph in (False, True):
        rows = table(trace_prune(graph))
        entry = "pruning/graph.py" if graph else "pruning/chain.py"
        assert {r[0] for r in rows} >= {"pruning/prune.py", entry}
        assert max(r[1] for r in rows) <= 2, rows  # visits: distinct entry edges per module
        assert all(r[3] == 0 for r in rows), rows  # nothing hands the model back up a layer
