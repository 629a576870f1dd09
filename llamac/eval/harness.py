"""lm-evaluation-harness on llamac's own engine: the `llamac` model type (the `eval` extra).

    python -m llamac.eval.harness --model llamac --model_args checkpoint=runs/tiny --tasks hellaswag
    llamac-lm-eval ...                    # the same, as an installed script

take exactly `lm_eval`'s arguments: they register the model type, then run lm_eval's own command line.
(lm-eval 0.4 finds model types only in its own registry, filled by imports; it has no plugin entry
point, so a bare `lm_eval --model llamac` cannot see a model type defined outside it.) From Python,
`import llamac.eval.harness` registers it for `lm_eval.simple_evaluate(model="llamac", ...)`.

model_args: checkpoint (llamac checkpoint, run out_dir or Hugging Face Llama folder), dtype (auto,
fp32, bf16), batch_tokens (padded tokens per forward), max_gen_toks; the device is lm_eval's own
--device (cpu, cuda; auto when not given).

The three request types run on llamac's scorer and sampler: loglikelihood through
`loglik.score_pairs` (the pairs `llamac eval`'s multiple choice makes, so both give the same
accuracy on the same items), loglikelihood_rolling through its rolling windows (as `bpb`), and
generate_until greedily (with do_sample and a temperature, sampled) until a stop string, </s> or
<|end|>.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

from llamac.engine import backend
from llamac.errors import LlamacError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LlamacError("the lm-evaluation-harness adapter needs lm-eval: pip install 'llamac[eval]'") from None
from llamac.eval.loglik import encode_pair, rolling_pairs, score_pairs
from llamac.eval.runner import load_scoring_model


class LlamacLM(LM):
    def __init__(self, checkpoint=None, device=None, dtype: str = "auto", batch_tokens=None,
                 max_gen_toks: int = 256, **_ignored):
        super().__init__()
        if checkpoint is None:
            raise LlamacError("--model_args needs checkpoint=PATH (a llamac checkpoint or Hugging Face Llama folder)")
        # lm_eval passes --device as given (cuda:0, cpu, ...) and its own batch-size options, which
        # mean nothing here: batches are made by padded tokens.
        device = backend.resolve_device(str(device).split(":")[0] if device else "auto")
        self.model, self.tok, _ = load_scoring_model(str(checkpoint), device, str(dtype))
        self.batch_tokens = int(batch_tokens) if batch_tokens else None
        self.max_gen_toks = int(max_gen_toks)
        self._device = device
        self.checkpoint = str(checkpoint)
        self.chat = False       # set once lm_eval renders prompts with the chat template: its tokens are special

    def _scores(self, pairs, disable_tqdm: bool, what: str):
        with tqdm(total=len(pairs), desc=what, disable=disable_tqdm, file=sys.stderr) as bar:
            return score_pairs(self.model, pairs, self.batch_tokens, bar.update)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [encode_pair(self.tok, context, continuation, self.chat) for context, continuation in (r.args for r in requests)]
        results = [(s.logprob, s.greedy) for s in self._scores(pairs, disable_tqdm, "llamac loglikelihood")]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        max_len = self.model.config.max_seq_len
        owners, pairs = [], []
        for k, request in enumerate(requests):
            pieces = rolling_pairs(self.tok.encode(request.args[0], bos=False), self.tok.bos_id, max_len)
            owners += [k] * len(pieces)
            pairs += pieces
        totals = [0.0] * len(requests)
        for k, score in zip(owners, self._scores(pairs, disable_tqdm, "llamac loglikelihood_rolling")):
            totals[k] += score.logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Greedy requests on the GPU go 16 at a time through the fast decoder (to max_gen_toks, then
        cut at the first stop string); the others, and sampled ones, one by one."""
        out = [None] * len(requests)
        groups: dict = {}
        for k, request in enumerate(requests):
            options = dict(request.args[1] or {})
            groups.setdefault(repr(sorted(options.items())), (options, []))[1].append(k)
        with tqdm(total=len(requests), desc="llamac generate_until", disable=disable_tqdm, file=sys.stderr) as bar:
            for options, members in groups.values():
                texts = self._generate_group([requests[k].args[0] for k in members], options)
                for k, text in zip(members, texts):
                    out[k] = text
                    self.cache_hook.add_partial("generate_until", requests[k].args, text)
                bar.update(len(members))
        return out

    def _generate_group(self, contexts: list[str], options: dict) -> list[str]:
        from llamac.eval.skills import greedy_batched
        from llamac.infer.chat import END_OF_TURN
        from llamac.infer.generate import generate_ids
        until = options.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_len = self.model.config.max_seq_len
        room = max(1, min(int(options.get("max_gen_toks", self.max_gen_toks)), max_len - 1))
        prompts = [self.tok.encode(c, bos=True, special=self.chat)[-(max_len - room):] for c in contexts]
        temperature = float(options.get("temperature", 0.0) or 0.0) if options.get("do_sample") else 0.0
        stops = {self.tok.eos_id, self.tok.piece_to_id(END_OF_TURN)}
        made = None
        if temperature == 0.0 and self._device == "cuda":
            made = greedy_batched(self.model, prompts, room, stops)
        if made is None:
            made = []
            for ids in prompts:
                tokens = []
                for token in generate_ids(self.model, ids, room, temperature=temperature, stop_ids=stops):
                    tokens.append(token)
                    if any(stop in self.tok.decode(ids + tokens)[len(self.tok.decode(ids)):] for stop in until):
                        break
                made.append((tokens, None))
        texts = []
        for ids, (tokens, _) in zip(prompts, made):
            text = self.tok.decode(ids + tokens)[len(self.tok.decode(ids)):]
            cuts = [text.find(stop) for stop in until if stop in text]
            texts.append(text[:min(cuts)] if cuts else text)
        return texts

    @property
    def tokenizer_name(self) -> str:
        return f"llamac:{self.checkpoint}"

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        from llamac.infer.chat import render
        self.chat = True
        text, _ = render(chat_history, bos="", add_generation_prompt=add_generation_prompt)
        return text


def main(argv=None) -> None:
    """lm_eval's command line with the `llamac` model type registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except LlamacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    # Run as `python -m`, this file is __main__: the model type registered is the importable one.
    from llamac.eval.harness import main as harness_main
    harness_main()
else:
    register_model("llamac")(LlamacLM)
