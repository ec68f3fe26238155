"""Data: the Batch container, prompt datasets + sampler, the synthetic task, tiny models.

Modules: ``batch`` (Batch), ``config`` (DataConfig, the loader slice of the training
config's ``data`` section), ``records`` (reading files, row checks), ``tokenization``
(messages -> prompt ids, shared by training, fipo-eval and the warm start), ``dataset``
(PromptDataset, collate_prompts), ``sampler`` (ResumableSampler), ``synthetic``
(arithmetic task), ``tiny_model`` (build_tiny_model), ``warm_start`` (SFT warm start,
greedy accuracy), ``prepare`` (the ``fipo-data`` command).
"""
