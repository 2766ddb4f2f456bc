"""Generation with a transformers model: batches of requests with the same sampling settings, and token
streams. No HTTP and no Serve in here, so benchmarks and tests can drive it in-process."""

import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class GenRequest:
    input_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None

    def group_key(self) -> tuple:
        """Requests that can share one ``generate`` call (seeded sampling runs alone)."""
        greedy = self.temperature == 0
        return (greedy, None if greedy else (self.temperature, self.top_p, self.seed, id(self) if self.seed is not None else None))


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Engine:
    """A transformers model answering batches of prompts; no Serve or HTTP in here."""

    def __init__(self, model_dir: str, trust_remote_code: bool = False, base_model: str | None = None):
        import torch

        from sft_ray.modeling import load_for_inference

        self.torch = torch
        self.model, self.tok = load_for_inference(model_dir, trust_remote_code, base_model)
        self.device = self.model.device
        cfg = self.model.config.get_text_config()
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        self.eos_ids = {self.tok.eos_token_id}
        gen_eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        self.eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.eos_ids.discard(None)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, prompt: str) -> list[int]:
        return self.tok(prompt, add_special_tokens=True)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def _gen_kwargs(self, r: GenRequest, max_new: int) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id,
                                  eos_token_id=sorted(self.eos_ids))
        if r.temperature == 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=None)
        return kw

    def _finish(self, r: GenRequest, ids: list[int]) -> GenResult:
        """Cut at end-of-sequence, the request's own max_tokens, and its stop strings."""
        reason = "length"
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                ids, reason = ids[:i], "stop"
                break
        if len(ids) >= r.max_tokens:
            ids, reason = ids[: r.max_tokens], "length" if reason != "stop" or len(ids) > r.max_tokens else reason
        text = self.tok.decode(ids, skip_special_tokens=True)
        n = len(ids)
        cut = min((text.find(s) for s in r.stop if s and s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            n = self.count_tokens(text)
        return GenResult(text=text, prompt_tokens=len(r.input_ids), completion_tokens=n, finish_reason=reason)

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Generate for several requests, batching those with the same sampling settings."""
        torch = self.torch
        results: list[GenResult | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.group_key(), []).append(i)
        for idx in groups.values():
            batch = [reqs[i] for i in idx]
            width = max(len(r.input_ids) for r in batch)
            pad = self.tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in batch])
            attn = torch.tensor([[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in batch])
            if batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device),
                    **self._gen_kwargs(batch[0], max(r.max_tokens for r in batch)),
                )
            for j, i in enumerate(idx):
                results[i] = self._finish(reqs[i], out[j, width:].tolist())
        return results  # type: ignore[return-value]

    def stream(self, r: GenRequest, cancelled: threading.Event):
        """Yield text pieces as they are generated; stops early when ``cancelled`` is set."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        torch = self.torch

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return cancelled.is_set()

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([r.input_ids], device=self.device)
        kwargs = self._gen_kwargs(r, r.max_tokens)
        result: dict[str, Any] = {}

        def run():
            try:
                if r.seed is not None:
                    torch.manual_seed(r.seed)
                with torch.inference_mode():
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                              stopping_criteria=StoppingCriteriaList([_Cancelled()]), **kwargs)
                result["ids"] = out[0, ids.shape[1]:].tolist()
            except Exception as e:  # surfaces in the response stream instead of hanging it
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return streamer, thread, result
