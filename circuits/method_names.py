"""Names of the explanation methods and circuit-discovery metrics and corruptions, importable without torch (the command line's `--help`
lists them and must answer at once). `circuits.explain.methods.METHODS` implements exactly
these (checked when it is imported), and so do `circuits.circuit_discovery`'s METRICS and
CORRUPTIONS."""

METHOD_NAMES = ("attention", "rollout", "gae", "gradcam", "class_embedding", "tokentm", "transformer_attribution",
                "random")
DEFAULT_METHODS = ("attention", "rollout", "gae", "gradcam", "class_embedding", "tokentm", "random")

CIRCUIT_METRICS = ('logit_diff', 'target_logit', 'rank', 'identifiability', 'cross_entropy')
CIRCUIT_CORRUPTIONS = ('shuffle', 'blur', 'noise', 'mean', 'reverse_frames', 'shuffle_frames', 'freeze_frames')
CLIP_CORRUPTIONS = ('reverse_frames', 'shuffle_frames', 'freeze_frames')  # clips only (video models)
