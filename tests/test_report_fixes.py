"""Report fixes of issue 23, item 17: the SAE evaluation table (one column per run, words not
snake_case, n/a not None, no "held-out" claim) and class names with their ids."""

from __future__ import annotations

import json

from circuits.report import sae as sae_section
from circuits.runs.results import RunStore


def test_sae_eval_table_fits_the_page_and_reads_as_words(tmp_path):
    run = tmp_path / "eval"
    RunStore(run, {"analysis": "sae_eval", "dataset": "SyntheticShapes(len=8)"})
    (run / "eval.json").write_text(json.dumps({"mse": 0.5, "explained_variance": 0.9, "dense_features": None,
                                               "per_class": [1, 2]}))
    html = "".join(sae_section.report_section({"eval": run}))
    assert "explained variance" in html and "explained_variance" not in html
    assert "None" not in html and "n/a" in html
    assert "held-out" not in html.lower() and "&amp;#x27;" not in html
    header = html[html.index("<tr"):html.index("</tr>")]
    assert "metric" in header and "eval" in header and "mse" not in header  # metrics are rows


def test_sae_feature_table_names_classes_with_their_ids():
    s = {"hook_name": "blocks.0.hook_resid_post", "n_images": 4, "identified_at": 0.5, "hist_edges": [0, 1],
         "features": {}, "class_names": ["crane", "crane"],
         "identified": {"label": [{"value": 1, "feature": 3, "correlation": 0.7, "top_image_share": 1.0,
                                   "identified": True}]}}
    html = "".join(sae_section._features("f", s, 2))
    assert "crane (1)" in html


def test_circuit_graph_labels_the_mlp_row_and_the_layers():
    import pandas as pd

    from circuits.plot import circuit_graph

    edges = pd.DataFrame({"upstream": ["embed", "L0H1", "MLP0"], "downstream": ["L0H1.q", "MLP0", "logits"],
                          "score": [0.5, -0.2, 0.3], "in_circuit": [True, True, True]})
    fig = circuit_graph(edges, title="t", n_heads=4)
    y = fig.layout.yaxis
    assert list(y.ticktext)[list(y.tickvals).index(4)] == "MLP" and "head 3" in y.ticktext
    assert list(fig.layout.xaxis.ticktext) == ["L0"]
    text = [t for d in fig.data if d.mode == "markers+text" for t in d.textposition]
    assert "top center" in text and "bottom center" in text


def test_report_sample_images_spread_over_the_classes():
    import numpy as np
    import pandas as pd

    from circuits.report.identify import _sample

    class Res:
        images = pd.DataFrame({"index": np.arange(12), "label": [0] * 8 + [1] * 2 + [2] * 2})

    picks = _sample(Res(), {i: object() for i in range(12)}, 3)
    assert sorted(Res.images["label"].to_numpy()[picks].tolist()) == [0, 1, 2]


def test_report_keeps_runs_whose_results_are_files_not_batches(tmp_path):
    """sae eval writes eval.json and no batches: it is a run with results, not an empty one."""
    from circuits.report import build_report

    run = tmp_path / "runs" / "eval"
    RunStore(run, {"analysis": "sae_eval", "dataset": "d"})
    (run / "eval.json").write_text(json.dumps({"mse": 0.5}))
    html = build_report([tmp_path / "runs"], tmp_path / "r.html", progress=False).read_text()
    assert "without results" not in html and "Evaluation on the images" in html
