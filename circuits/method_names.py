"""Names of the explanation methods, importable without torch (the command line's `--help`
lists them and must answer at once). `circuits.explain.methods.METHODS` implements exactly
these (checked when it is imported)."""

METHOD_NAMES = ("attention", "rollout", "gae", "gradcam", "class_embedding", "tokentm", "transformer_attribution",
                "random")
DEFAULT_METHODS = ("attention", "rollout", "gae", "gradcam", "class_embedding", "tokentm", "random")
