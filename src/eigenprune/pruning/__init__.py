"""What to keep, and removing the rest: node importance and criteria, one pruning entry (`prune_nodes`) above two
paths (`chain`: exact removal from an MLP with bias folding; `graph`: any model Torch-Pruning can trace), the
minimal-width search, the one-call `shrink` (train, prune, fine-tune, measure), checkpoints and ONNX export.

`keep` counts what STAYS (keep=0.3 keeps 30%); Torch-Pruning's `pruning_ratio` and `torch.nn.utils.prune`'s `amount`
count what goes.
"""

from eigenprune.pruning.chain import loss_by_kept, mask_nodes, prune_chain, ranked_layers, remove_nodes, select_nodes
from eigenprune.pruning.checkpoint import CheckpointError, load_model, save_model
from eigenprune.pruning.criteria import CRITERIA, Criterion, get_criterion, register
from eigenprune.pruning.export import ExportError, export_module_onnx, export_onnx
from eigenprune.pruning.graph import (
    ROOT_TYPES,
    SPECTRAL_PRUNERS,
    ChannelPlan,
    EigenImportance,
    choose_channels,
    mask_graph,
    prune_graph,
    select_channels,
)
from eigenprune.pruning.importance import node_importance
from eigenprune.pruning.keep import KeepSpec, PruneError, parse_keep
from eigenprune.pruning.prune import prune_nodes
from eigenprune.pruning.search import SearchResult, minimal_width
from eigenprune.pruning.shrink import ShrinkResult, shrink

__all__ = [
    "CRITERIA",
    "ROOT_TYPES",
    "SPECTRAL_PRUNERS",
    "ChannelPlan",
    "CheckpointError",
    "Criterion",
    "EigenImportance",
    "ExportError",
    "KeepSpec",
    "PruneError",
    "SearchResult",
    "ShrinkResult",
    "choose_channels",
    "export_module_onnx",
    "export_onnx",
    "get_criterion",
    "load_model",
    "loss_by_kept",
    "mask_graph",
    "mask_nodes",
    "minimal_width",
    "node_importance",
    "parse_keep",
    "prune_chain",
    "prune_graph",
    "prune_nodes",
    "ranked_layers",
    "register",
    "remove_nodes",
    "save_model",
    "select_channels",
    "select_nodes",
    "shrink",
]
