"""Implicit fusion's data (FuseChat-3.0, arXiv 2503.04222; WRPO, arXiv 2412.03187): sample
responses to a prompt set from every source, score them with a reward, and build the SFT set and
the preference pairs (``fusechat sample``, ``score``, ``pairs``).

``sample`` (one folder per model) renders each prompt (a conversation's messages up to its last
user turn) with the model's template, as capture does (a template named, or the tokenizer's own),
and samples ``n`` responses with transformers ``generate`` (left padding,
``num_return_sequences=n``), the model's ``generation_config.json`` set aside but for its stop
tokens. Shard ``s`` covers prompts ``[s * shard_rows, (s + 1) * shard_rows)`` of the corpus
whatever its model's template refuses, so every model's shard ``s`` holds the same prompts, and it
draws from its own seed (``shard_seed``): a resumed run writes the bytes an uninterrupted one
writes. One row per response: ``pos.text`` (its UTF-8 bytes: the shards' variable-length axis
holds one position per byte), ``row.index`` (the prompt: the conversation's index in the loaded
corpus), ``row.sample`` (0..n-1), ``row.n_tokens`` (tokens generated, the stop token included),
``row.prompt_tokens`` and ``row.finished`` (a stop token ended it, not ``max_new_tokens``). Text,
not token ids: what comes next (rewards, the TRL sets, the target's training) reads text, and
reads it without the sampling model's tokenizer.

``score`` reads one sample folder per source (the same corpus and shards), gives every response a
reward (``fusechat.implicit.rewards.REWARDS``: ``toy``, the toy rule judge's verdict on the row's right
values; ``hf``, a sequence-classification reward model's logit; ``judge``, an endpoint's rating)
and writes shard ``s`` with every model's responses to its prompts, ordered by prompt, model
(the order the folders were given) and sample: the sample rows plus ``row.model`` and
``row.reward`` (float64).

``pairs`` turns a score folder into ``sft.jsonl`` (``{"messages": [...]}``) and ``dpo.jsonl``
(``{"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``), TRL's
conversational formats, with a manifest holding their checksums (``read_pairs``). The prompts
are split between the two by a hash of each prompt (``sft_side``); the choices are
``sft_choice`` and ``preference_pair``.
"""
