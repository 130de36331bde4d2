"""Quantizing a pretrained transformer (lesson 16, lab 11).

One method per module: ``corpus`` (the text), ``model`` (a char-level GPT), ``evaluate``
(perplexity, next-byte accuracy), ``stats`` (where activation outliers live), ``w8a8``
(per-tensor vs per-token/per-channel int8), ``int8_mixed`` (LLM.int8()), ``smoothquant``,
``weight_only`` (int4/int3 groups, torchao's convention), ``gptq``, ``awq``.
"""
