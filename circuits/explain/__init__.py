"""Explanation maps for Vision Transformers and the per-batch tests that judge them
(Chefer, Gur & Wolf 2021; Vilas et al. 2023; docs/explanations.md).

    from circuits.explain import explain, upsample
    rel = explain("gae", model, images, targets)          # [b, n_patches]
    pix = upsample(rel, model.cfg.img_size)               # [b, H, W] in [0, 1]

Methods (`METHODS`): attention, rollout, gae, gradcam, class_embedding, tokentm, transformer_attribution, random.
Evaluations: `segmentation_counts` / `segmentation_scores`, `perturbation_curve`, `auc`,
`keep_auc`, `randomization_check`; the dataset-level benchmark is `circuits.runs.explain`.
See docs/explanations.md.
"""
from circuits.explain.evaluate import (FRACTIONS, auc, average_precision, cascading_randomization, keep_auc,
                                       perturbation_curve, randomization_check, relevance_order,
                                       segmentation_counts, segmentation_scores, spearman)
from circuits.explain.methods import (DEFAULT_METHODS, GRADIENT_METHODS, METHODS, explain, explain_many,
                                      parse_method, upsample)
from circuits.explain.trace import AttentionTrace, readout_weights, trace

__all__ = [
    "explain", "explain_many", "upsample", "METHODS", "DEFAULT_METHODS", "GRADIENT_METHODS", "parse_method",
    "trace", "AttentionTrace", "readout_weights",
    "segmentation_counts", "segmentation_scores", "average_precision", "perturbation_curve", "relevance_order",
    "auc", "keep_auc", "FRACTIONS", "randomization_check", "cascading_randomization", "spearman",
]
