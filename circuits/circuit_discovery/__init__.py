"""Circuit discovery on ViTs: attribution patching (AtP), path patching, edge attribution
patching (EAP, EAP-IG), pruning and faithfulness. See docs/circuit_discovery.md."""

from circuits.circuit_discovery.attribution_patching import attribution_patch
from circuits.circuit_discovery.corruptions import CORRUPTIONS, corrupt
from circuits.circuit_discovery.eap import Circuit, edge_attribution, faithfulness, prune
from circuits.circuit_discovery.graph import ViTGraph
from circuits.circuit_discovery.metrics import METRICS, resolve_metric
from circuits.circuit_discovery.path_patching import path_patch

__all__ = ["attribution_patch", "CORRUPTIONS", "corrupt", "Circuit", "edge_attribution", "faithfulness",
           "prune", "ViTGraph", "METRICS", "resolve_metric", "path_patch"]
