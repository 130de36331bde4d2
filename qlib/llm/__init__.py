"""Quantizing a pretrained transformer (lesson 16, lab 11).

One method per module: ``corpus`` (the text), ``model`` (a char-level GPT, also reachable as
``qlib.models.charlm`` / ``qlib.models.CharLM``), ``evaluate`` (perplexity, next-byte accuracy),
``stats`` (where activation outliers live), ``w8a8`` (per-tensor vs per-token/per-channel int8;
dynamic or static, calibrated activation scales), ``int8_mixed`` (LLM.int8()), ``smoothquant``
(with the paper's O1/O2/O3 levels), ``weight_only`` (int4/int3 groups, torchao's convention),
``gptq``, ``awq`` (scale search, then per-group clipping search).
"""
