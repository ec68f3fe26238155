"""Data: the Batch container, prompt datasets + sampler, the synthetic task, tiny models.

Modules: ``batch`` (Batch), ``config`` (DataConfig), ``dataset`` (PromptDataset,
ResumableSampler, collate_prompts), ``synthetic`` (arithmetic task), ``tiny_model``
(build_tiny_model), ``warm_start`` (SFT warm start, greedy accuracy), ``prepare``
(the ``fipo-data`` command).
"""
