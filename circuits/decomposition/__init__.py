"""Component decomposition of ViT representations (Balasubramanian et al. 2024).

- `decompose`: exact components of the representation (embedding, heads, MLPs, biases),
  `token_terms` (heads split by source token, chunked), `decompose_dataset`;
- `align`: per-component linear maps into a target space (e.g. CLIP's), orthogonality penalty;
- `scoring`: feature scores, retrieval, token heatmaps;
- `segmentation`: zero-shot segmentation maps from the top components' token terms;
- `spurious`: spurious-feature removal by mean ablation, group accuracies;
- `planted`: a planted shortcut head for ground-truth checks;
the resumable dataset-level run behind `hooked-vit decompose` is `circuits.runs.decompose`.

See docs/decomposition.md.
"""

from circuits.decomposition.align import ComponentMaps, fit_alignment, identity_maps
from circuits.decomposition.decompose import (
    Component, Decomposition, DecomposedSet, TimeTerms, decompose, decompose_dataset, head_token_terms, per_time_terms,
    split_biases, split_reference, token_terms,
)
from circuits.decomposition.scoring import (
    FeatureScorer, component_scores, feature_retrieval, image_retrieval, orthonormal_basis, token_heatmaps,
    top_components,
)
from circuits.decomposition.segmentation import class_direction, decomposition_segmentation
from circuits.decomposition.spurious import SpuriousRemoval, feature_basis, fit_removal, group_accuracy, mean_ablate

__all__ = [
    "Component", "Decomposition", "DecomposedSet", "TimeTerms", "per_time_terms", "decompose", "decompose_dataset", "head_token_terms",
    "split_biases", "split_reference", "token_terms", "ComponentMaps", "fit_alignment", "identity_maps", "FeatureScorer",
    "component_scores", "feature_retrieval", "image_retrieval", "orthonormal_basis", "token_heatmaps",
    "top_components", "class_direction", "decomposition_segmentation", "SpuriousRemoval", "feature_basis", "fit_removal", "group_accuracy", "mean_ablate",
]
