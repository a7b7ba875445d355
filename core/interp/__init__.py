"""The features workbench engine: transcoders, their features, explanations and scores.

Pipeline (each step a generator of events; the CLI is ``python -m core transcoders ...``):

1. :func:`train_transcoders` -> a :class:`TranscoderSet` (one :class:`Transcoder` per MLP layer)
   saved in a folder with per-layer quality (:mod:`.quality`).
2. :func:`collect_features` -> a :class:`FeatureStore` (SQLite) of feature statistics, contexts,
   promoted/suppressed tokens.
3. :func:`describe_store` with an :class:`Explainer` (:class:`BuiltinExplainer` offline, or
   :class:`LMExplainer` for flan-t5 and friends) -> explanations, held-out scores, per-layer and
   total descriptions in the store.
4. :func:`explain_completion` -> a :class:`CompletionExplanation`: per-layer and total
   descriptions of how the model produced a completion, with scores.

Other tools' formats: :func:`export_saelens` / :func:`import_saelens` write a set as SAELens
folders and read SAELens transcoders back as a set (:mod:`.saelens`); :func:`export_neuronpedia`
writes a feature store as the JSON Neuronpedia and SAEDashboard load (:mod:`.neuronpedia`).

Addresses are TransformerLens names, all built by :func:`core.models.hooks.act_name`: transcoder
``i`` reads ``blocks.{i}.ln2.hook_normalized`` and writes ``blocks.{i}.hook_mlp_out``
(:func:`.config.transcoder_hooks`); feature ``f`` of it is ``blocks.{i}.transcoder.{f}``. The
configs and every default live in :mod:`.config`, which needs no torch.
"""
from ..lazy import lazy_exports, names

__getattr__, __dir__ = lazy_exports(__name__, {
    **names(".activations", "CorpusTokens", "corpus_from_texts", "corpus_tokens", "model_loss", "mlp_io"),
    **names(".config", "ACTIVATIONS", "TRAIN_ACTIVATIONS", "SAVE_DTYPES", "CollectConfig", "TranscoderConfig", "TranscoderTrainConfig", "transcoder_hooks"),
    **names(".collect", "CollectFinished", "CollectProgress", "CollectStarted", "collect_features", "logit_effects"),
    **names(".completion", "CompletionExplained", "CompletionExplanation", "CompletionStarted", "FeatureAttribution", "Generated", "LayerExplained", "LayerExplanation", "attribute", "explain_completion", "run_explain_completion"),
    **names(".explain", "BUILTIN", "BuiltinExplainer", "DescribeFinished", "DescribeStarted", "Explainer", "FeatureEvidence", "FeatureExplained", "LayerDescribed", "LMExplainer", "describe_store", "load_explainer"),
    **names(".neuronpedia", "export_neuronpedia", "read_neuronpedia"),
    **names(".quality", "LayerQuality", "evaluate_transcoders"),
    **names(".saelens", "export_saelens", "import_saelens"),
    **names(".scoring", "RuleDetector", "RuleSimulator", "balanced_accuracy", "detection_score", "interpretability_from_scores", "quoted_tokens", "score_feature", "simulation_score"),
    **names(".store", "FTS5", "Context", "FeatureCard", "FeatureStats", "FeatureStore", "FeatureSummary", "LayerInfo", "Score", "SearchHit", "open_store", "store_error", "store_path"),
    **names(".train", "Evaluated", "Saved", "TrainFinished", "TrainProgress", "TrainStarted", "Validated", "run_to_end", "train_transcoders"),
    **names(".transcoder", "Transcoder", "TranscoderSet", "find_transcoder_set", "is_transcoder_folder", "load_transcoder_set", "transcoder_dir_for"),
})
