"""The model backends of ``fusechat capture``: transformers (``HFScorer``) and vLLM
(``VLLMScorer``). Each scores token windows (top-K and the gold token's log-probability at every
position) and continues candidate tokens greedily (the capture's lookahead)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fusechat.errors import FusechatError


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group items into batches of similar length: longest first, each batch's padded size
    ``len(batch) * max_length`` within ``batch_tokens`` (an item longer than that runs alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def topk_and_gold(
    logits: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From logits (T, V) and the gold next tokens (T; -1 where none): top-K ids and
    log-probabilities ``log softmax(logits)`` (T, K), and the gold log-probability
    ``log p_t(targets[t])`` (T; 0 where there is no target)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k, dim=-1)
    gold = logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    gold = torch.where(targets >= 0, gold, torch.zeros_like(gold))
    return top.indices.cpu().numpy(), top.values.cpu().numpy(), gold.cpu().numpy()


def _with_cache(model, cache) -> dict:
    """The KV cache as forward's keyword: ``cache`` from transformers 5.2x on
    (``past_key_values`` is removed in 5.40), ``past_key_values`` before (vLLM's pin)."""
    import inspect

    new = "cache" in inspect.signature(model.forward).parameters
    return {"cache" if new else "past_key_values": cache}


def _cache_of(out):
    """The KV cache a forward returned, under either name."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


class HFScorer:
    """transformers forward passes; ``device_map="auto"`` spreads a large model over the GPUs
    (one process), or each data-parallel rank holds its own copy on its own GPU."""

    def __init__(
        self, path: str, dtype: str, device: int | None = None, n_tokens: int | None = None
    ):
        """``n_tokens``: the tokenizer's size. An embedding padded past it (Qwen's 152,064 rows
        for 151,665 tokens) has logits for ids no text has: they are cut before the softmax,
        so no padded id is ever captured or continued with."""
        from fusechat.data import load_model, resolve_dtype

        cuda = torch.cuda.is_available()
        dtype = resolve_dtype(dtype)
        where = ("auto" if device is None else {"": device}) if cuda else None
        self._adopt(load_model(path, dtype=getattr(torch, dtype), device_map=where), n_tokens, path)

    @classmethod
    def from_model(cls, model, n_tokens: int | None = None) -> HFScorer:
        """A scorer over a model already in memory (``bench/gpu.py``'s random weights)."""
        scorer = cls.__new__(cls)
        scorer._adopt(model, n_tokens, type(model).__name__)
        return scorer

    def _adopt(self, model, n_tokens: int | None, name: str) -> None:
        self.model = model.eval()
        rows = self.model.get_input_embeddings().num_embeddings
        if n_tokens is not None and n_tokens > rows:
            raise FusechatError(f"{name}: the tokenizer has {n_tokens} tokens, the model's "
                                f"embedding {rows} rows")  # fmt: skip
        self.vocab_size = n_tokens or self.model.config.vocab_size

    @torch.inference_mode()
    def score(
        self, segs: Sequence[Sequence[int]], nexts: Sequence[int], k: int
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each segment: top-K ids and log-probs per position, and the gold log-prob of
        the token that follows each position (``nexts[i]`` after the segment's last one)."""
        n = max(len(s) for s in segs)
        ids = torch.zeros((len(segs), n), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(segs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
        device = self.model.get_input_embeddings().weight.device
        logits = self.model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        logits = logits[..., : self.vocab_size]  # no padded embedding row is a candidate
        out = []
        for i, s in enumerate(segs):
            targets = torch.tensor([*s[1:], nexts[i]], device=logits.device)
            out.append(topk_and_gold(logits[i, : len(s)], targets, k))
        return out

    @torch.inference_mode()
    def continue_candidates(
        self, window: Sequence[int], cands: Sequence[tuple[int, int]], n: int, chunk: int = 256
    ) -> np.ndarray:
        """The ``n`` greedy tokens after each candidate ``(t, token)`` placed after
        ``window[: t + 1]``, as (len(cands), n) ids.

        One forward pass over the window fills its KV cache; then ``n`` passes decode every
        candidate at once as extra tokens after the window, a 4D attention mask letting each
        see the window up to its own ``t`` and its own earlier tokens, at positions ``t + 1,
        t + 2, ...`` (tree attention): the cost is ``n`` steps of ``len(cands)`` tokens, not a
        prefill per candidate. The same tokens as decoding each prompt alone (tested).

        A model with sliding-window attention shorter than the window plus ``n`` (Gemma 3's
        local layers) keeps only recent keys and would see past its window under the custom
        mask: it decodes each prompt on its own instead (``prefill_per_candidate``)."""
        slide = getattr(self.model.config, "sliding_window", None)
        if slide is not None and slide < len(window) + n:
            return prefill_per_candidate(self.model, window, cands, n, self.vocab_size)
        device = self.model.get_input_embeddings().weight.device
        dtype = self.model.get_input_embeddings().weight.dtype
        ids = torch.tensor([list(window)], device=device)
        got = np.zeros((len(cands), n), np.int64)
        for a in range(0, len(cands), chunk):
            part = cands[a : a + chunk]
            pt = torch.tensor([t for t, _ in part], device=device)
            toks = torch.tensor([c for _, c in part], device=device)
            prefix = torch.arange(len(window), device=device)[None, :] <= pt[:, None]
            own = torch.eye(len(part), dtype=torch.bool, device=device)
            cache = _cache_of(self.model(input_ids=ids, use_cache=True))
            steps = []
            for s in range(n):
                allow = torch.cat([prefix, own.repeat(1, s + 1)], dim=1)
                mask = torch.zeros(allow.shape, dtype=dtype, device=device)
                mask = mask.masked_fill(~allow, torch.finfo(dtype).min)[None, None]
                out = self.model(input_ids=toks[None], attention_mask=mask,
                                 position_ids=(pt + 1 + s)[None], use_cache=True,
                                 **_with_cache(self.model, cache))  # fmt: skip
                cache, toks = _cache_of(out), out.logits[0, :, : self.vocab_size].argmax(-1)
                steps.append(toks)
            got[a : a + len(part)] = torch.stack(steps, 1).cpu().numpy()
        return got


@torch.inference_mode()
def prefill_per_candidate(
    model,
    window: Sequence[int],
    cands: Sequence[tuple[int, int]],
    n: int,
    vocab_size: int | None = None,
    batch_tokens: int = 8192,
) -> np.ndarray:
    """``HFScorer.continue_candidates`` one prompt per candidate (``window[: t + 1]``, then the
    candidate): prompts left-padded into batches by length, prefilled, then ``n - 1`` cached
    steps. Correct for any attention; each candidate re-reads its prefix."""
    device = model.get_input_embeddings().weight.device
    prompts = [[*window[: t + 1], c] for t, c in cands]
    got = np.zeros((len(prompts), n), np.int64)
    for batch in plan_batches([len(p) for p in prompts], batch_tokens):
        width = len(prompts[batch[0]])  # plan_batches puts the longest first
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, j in enumerate(batch):
            ids[r, width - len(prompts[j]) :] = torch.tensor(prompts[j])
            attn[r, width - len(prompts[j]) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        steps = [out.logits[:, -1, :vocab_size].argmax(-1)]
        for _ in range(n - 1):
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=steps[-1][:, None], attention_mask=attn, position_ids=pos,
                        use_cache=True, **_with_cache(model, _cache_of(out)))  # fmt: skip
            steps.append(out.logits[:, -1, :vocab_size].argmax(-1))
        got[batch] = torch.stack(steps, 1).cpu().numpy()
    return got


class VLLMScorer:
    """vLLM's ``prompt_logprobs``: the top-K at every prompt position in one prefill."""

    def __init__(self, path: str, dtype: str, max_length: int, k: int, tensor_parallel: int = 1):
        try:
            from vllm import LLM
        except ImportError:
            raise FusechatError(
                "backend vllm: vllm is not installed (pip install 'fusechat[vllm]')"
            ) from None
        from fusechat.data import resolve_dtype

        # vLLM's own auto is bf16 on CPUs too, which moves log-probs by ~3e-3
        dtype = resolve_dtype(dtype)
        self.llm = LLM(
            model=path,
            dtype=dtype,
            max_model_len=max_length + 1,
            max_logprobs=k + 1,
            enable_prefix_caching=False,
            seed=0,
            tensor_parallel_size=tensor_parallel,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def score(
        self, segs: Sequence[Sequence[int]], nexts: Sequence[int], k: int
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # The following token is appended so its gold log-prob comes back as a prompt logprob.
        prompts = [
            TokensPrompt(prompt_token_ids=[*s, n] if n >= 0 else list(s))
            for s, n in zip(segs, nexts, strict=True)
        ]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for s, n, o in zip(segs, nexts, outs, strict=True):
            full = [*s, n] if n >= 0 else list(s)
            # prompt_logprobs[t] holds the distribution predicting token t (None at t = 0)
            dists = list(o.prompt_logprobs[1 : len(s) + 1])
            if n < 0:
                dists.append(o.outputs[0].logprobs[0])
            ids = np.zeros((len(s), k), np.int64)
            lps = np.zeros((len(s), k), np.float32)
            gold = np.zeros(len(s), np.float32)
            for t, d in enumerate(dists):
                top = sorted((v.rank, tid, v.logprob) for tid, v in d.items())[:k]
                ids[t] = [tid for _, tid, _ in top]
                lps[t] = [lp for _, _, lp in top]
                if t + 1 < len(full):
                    gold[t] = d[full[t + 1]].logprob
            results.append((ids, lps, gold))
        return results

    def continue_candidates(
        self, window: Sequence[int], cands: Sequence[tuple[int, int]], n: int
    ) -> np.ndarray:
        """``HFScorer.continue_candidates`` as one prompt per candidate (``window[: t + 1]``
        and the candidate), generated greedily by vLLM."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [[*window[: t + 1], c] for t, c in cands]
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                 params, use_tqdm=False)  # fmt: skip
        got = np.full((len(prompts), n), -1, np.int64)
        for i, o in enumerate(outs):
            toks = list(o.outputs[0].token_ids)[:n]
            got[i, : len(toks)] = toks
        return got
