"""lm-evaluation-harness model `dllm_rl`: a LLaDA-architecture model folder or training checkpoint.

    python -m rl.lm_eval --model dllm_rl --model_args pretrained=DIR,gen_length=256,steps=128 --tasks gsm8k

lm-eval 0.4 finds models only in its own MODEL_MAPPING or through register_model in the running
process (it has no plugin entry point), so this module registers `dllm_rl` and then runs lm-eval's
own command line with the same arguments, as LLaDA's eval_llada.py does. docs/LM_EVAL.md has the
model_args and how they map to LLaDA's evaluation settings.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional extra: training never needs it
    raise ImportError("rl.lm_eval needs lm-evaluation-harness, the `eval` extra: pip install -e .[eval]") from e

from rl.batch import RolloutBatch
from rl.data.encode import decode_answers
from rl.models import load_checkpoint, resolve_model_dir
from rl.models.tokenizer import end_token_ids
from rollout.fast import FastSamplerConfig
from rollout.rollout import image_offset, sample, sampler_config
from rollout.sampler import SamplerConfig, exclude_non_text, guided_logits

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _none(value):
    # model_args arrive as strings (numbers and True/False converted); the fast sampler's "off" is null.
    return None if isinstance(value, str) and value.lower() in ("none", "null") else value


@register_model("dllm_rl")
class DiffusionLM(LM):
    def __init__(self, pretrained: str, gen_length: int = 256, steps: int = 128, block_length: int = 32,
                 temperature: float = 0.0, remasking: str = "low_confidence", sampler: str = "reference",
                 batch_size: int | str = 1, mc_num: int = 128, cfg: float = 0.0, is_check_greedy: bool = True,
                 seed: int = 1234, device: str | None = "cpu", dtype: str | None = None,
                 max_length: int | None = None, max_batch_size=None, **sampler_keys):
        super().__init__()
        del max_batch_size  # lm-eval passes it for its "auto" batch size, which this model does not do
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer ('auto' is not supported)")
        self.batch_size = int(batch_size)
        if int(mc_num) < 1 or int(mc_num) % self.batch_size:
            raise ValueError(f"mc_num={mc_num!r}: expected a positive multiple of batch_size={self.batch_size} "
                             "(each model call scores batch_size of the Monte-Carlo samples)")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)} (or unset: the checkpoint's)")
        # the fast sampler's own keys; the shared ones (gen_length, cfg_scale, ...) are named arguments
        fast_only = {f.name for f in fields(FastSamplerConfig)} - {f.name for f in fields(SamplerConfig)}
        unknown = sorted(set(sampler_keys) - fast_only)
        if unknown:
            raise ValueError(f"dllm_rl takes no model_args {unknown} (docs/LM_EVAL.md lists them)")
        self.path = resolve_model_dir(pretrained)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device, default cuda:0, to every model; a CPU machine still runs
            log.warning("dllm_rl: device=%s but CUDA is not available; running on the CPU", device)
            device = "cpu"
        self._device = torch.device(device or "cpu")
        model, self.tokenizer = load_checkpoint(self.path, DTYPES.get(dtype))
        self.model = model.to(self._device).eval()
        self.mask_id = self.tokenizer.mask_token_id
        self.end_ids = end_token_ids(self.tokenizer)
        self.text_vocab = image_offset(self.model.config, self.tokenizer)
        self.sampler = sampler_config({"sampler": sampler, "gen_length": gen_length, "steps": steps,
                                       "block_length": block_length, "temperature": float(temperature),
                                       "remasking": remasking, "cfg_scale": float(cfg),
                                       **{k: _none(v) for k, v in sampler_keys.items()}})
        self.mc_num, self.cfg, self.seed = int(mc_num), float(cfg), int(seed)
        self.is_check_greedy = bool(is_check_greedy)
        self.max_length = int(max_length or self.model.config.max_sequence_length)

    # --- chat templates (lm-eval's --apply_chat_template) ---

    @property
    def tokenizer_name(self) -> str:
        return str(self.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # Without a generation prompt lm-eval has prefilled the assistant turn: leave it open.
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text with the tokenizer's own special tokens (LLaDA's adds BOS, as its
        eval script does), or of chat-formatted text, which already starts with BOS, as it stands."""
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    # --- generate_until ---

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of contexts of similar length through the configured sampler. A request's
        max_gen_toks caps the answer length: min(gen_length, max_gen_toks rounded up to a block),
        with the same steps per block, and the answer is cut to max_gen_toks tokens. The text ends at
        the first end token and at the first of the request's `until` strings. Sampling settings
        come from model_args; a request's temperature/do_sample are not used."""
        out: list[str | None] = [None] * len(requests)
        jobs = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            ids = self.encode(context)
            length = self._answer_length(kwargs.get("max_gen_toks"))
            if len(ids) + length > self.max_length:  # keep the end of the context, as lm-eval's HF model does
                ids = ids[-(self.max_length - length):]
            jobs.append((length, len(ids), i, ids, kwargs))
        jobs.sort(key=lambda j: (j[0], j[1]))  # one answer length per batch, little padding
        generator = torch.Generator().manual_seed(self.seed)
        bar = tqdm(total=len(jobs), desc="dllm_rl generate_until", disable=disable_tqdm)
        at = 0
        while at < len(jobs):
            length = jobs[at][0]
            batch = [j for j in jobs[at:at + self.batch_size] if j[0] == length]
            at += len(batch)
            seqs = [torch.tensor([j[3]], dtype=torch.long) for j in batch]
            ids = RolloutBatch.left_pad(seqs, self.tokenizer.pad_token_id).to(self._device)
            mask = RolloutBatch.left_pad([torch.ones_like(q) for q in seqs], 0).to(self._device)
            cfg = self._sampler_for(length)
            answers = sample(self.model, self.tokenizer, ids, mask, cfg, generator).answer_ids.cpu()
            for (_, _, i, _, kwargs), answer in zip(batch, answers):
                limit = kwargs.get("max_gen_toks") or length
                text = decode_answers(self.tokenizer, answer[None, :limit], self.end_ids)[0]
                out[i] = self._postprocess(text, kwargs.get("until"))
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            bar.update(len(batch))
        bar.close()
        return out

    def _answer_length(self, max_gen_toks) -> int:
        bl = self.sampler.block_length
        if not max_gen_toks:
            return self.sampler.gen_length
        return min(self.sampler.gen_length, -(-int(max_gen_toks) // bl) * bl)

    def _sampler_for(self, length: int):
        per_block = self.sampler.steps // self.sampler.num_blocks
        return replace(self.sampler, gen_length=length, steps=per_block * (length // self.sampler.block_length))

    def _postprocess(self, text: str, until) -> str:
        stops = [until] if isinstance(until, str) else list(until or [])
        cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
        text = text[:cut]
        for special in self.tokenizer.all_special_tokens:  # headers etc. are no part of an answer
            text = text.replace(special, "")
        return text

    # --- loglikelihood ---

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """LLaDA's Monte-Carlo estimate of the masked-diffusion lower bound on log p(continuation |
        context), with mc_num samples, batch_size per model call, and a generator seeded afresh for
        every request: a request's value does not depend on its neighbours, and the choices of one
        question share their masking draws, which lowers the variance of their comparison."""
        out = []
        for req in tqdm(requests, desc="dllm_rl loglikelihood", disable=disable_tqdm):
            prefix, target = self._encode_pair(*req.args)
            if not target:
                result = (0.0, True)
            else:
                generator = torch.Generator().manual_seed(self.seed)
                result = (self._mc_loglikelihood(prefix, target, generator),
                          self._greedy(prefix, target) if self.is_check_greedy else False)
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: a context's trailing spaces belong to the continuation, and the
        continuation's ids are those of context + continuation past the context's."""
        if not context:
            bos = self.tokenizer.bos_token_id
            return [self.tokenizer.eos_token_id if bos is None else bos], \
                self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, prefix = self.encode(context + continuation), self.encode(context)
        target = whole[len(prefix):]
        if len(target) > self.max_length - 1:
            raise ValueError(f"continuation of {len(target)} tokens does not fit max_length={self.max_length}")
        return prefix[-(self.max_length - len(target)):], target

    @torch.no_grad()
    def _mc_loglikelihood(self, prefix: list[int], target: list[int], generator: torch.Generator) -> float:
        """-E_t[(1/t) * sum over masked continuation tokens of CE], t the masked fraction. As LLaDA:
        each model call's batch_size rows mask counts spread evenly over 1..T from a random start
        (stratified, lower variance than independent draws), each on a uniformly random subset."""
        b, P, T = self.batch_size, len(prefix), len(target)
        seq = torch.tensor(prefix + target, device=self._device).expand(b, -1)
        attn = torch.ones_like(seq)
        prompt_positions = (torch.arange(P + T, device=self._device) < P).expand(b, -1)
        total = 0.0
        for _ in range(self.mc_num // b):
            k = int(torch.randint(1, T + 1, (), generator=generator))
            n = (torch.linspace(k, k + (b - 1) * T / b, b).round().long() - 1) % T + 1
            rank = torch.rand(b, T, generator=generator).argsort(-1)  # a random permutation per row
            masked = (rank < n[:, None]).to(self._device)
            noisy = seq.clone()
            noisy[:, P:] = seq[:, P:].masked_fill(masked, self.mask_id)
            logits = guided_logits(self.model, noisy, attn, prompt_positions, self.mask_id, self.cfg, (P, P + T))
            ce = F.cross_entropy(logits[masked].float(), seq[:, P:][masked], reduction="none")
            weight = (T / n.to(self._device).float()).repeat_interleave(n.to(self._device))
            total += float((ce * weight).sum()) / b
        return -total / (self.mc_num // b)

    @torch.no_grad()
    def _greedy(self, prefix: list[int], target: list[int]) -> bool:
        """LLaDA's check: from an all-mask continuation, commit one token per step, the most
        confident argmax. Committed tokens never change, so the first wrong one settles it."""
        P, T = len(prefix), len(target)
        x = torch.tensor([prefix + [self.mask_id] * T], device=self._device)
        goal = torch.tensor(target, device=self._device)
        attn = torch.ones_like(x)
        prompt_positions = torch.arange(P + T, device=self._device)[None] < P
        for _ in range(T):
            logits = guided_logits(self.model, x, attn, prompt_positions, self.mask_id, self.cfg, (P, P + T))[0]
            exclude_non_text(logits, self.mask_id, self.text_vocab)
            probs = torch.softmax(logits.float(), -1)
            conf, x0 = probs.max(-1)
            conf = torch.where(x[0, P:] == self.mask_id, conf, -1.0)
            j = int(conf.argmax())
            if x0[j] != goal[j]:
                return False
            x[0, P + j] = x0[j]
        return True

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A lower bound on log p(text) for lm-eval's perplexity tasks: the text is cut into lm-eval's
        disjoint rolling windows of up to max_length tokens, each conditioned on the tokens before it,
        and the windows' Monte-Carlo bounds are added (the chain rule carries over to the bounds). A
        masked diffusion LM has no exact token-by-token likelihood, so perplexities from it are upper
        bounds and compare only between diffusion models scored the same way."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        bos = self.tokenizer.bos_token_id
        bos = self.tokenizer.eos_token_id if bos is None else bos
        out = []
        for req in tqdm(requests, desc="dllm_rl loglikelihood_rolling", disable=disable_tqdm):
            ids = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
            total = 0.0
            for prefix, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=bos, max_seq_len=self.max_length, context_len=1)):
                total += self._mc_loglikelihood(list(prefix), list(target), torch.Generator().manual_seed(self.seed))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with `dllm_rl` registered in this process."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [str(Path(sys.argv[0]).name or "lm-eval"), *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    # `python -m` runs this file as __main__; a later `import rl.lm_eval` must find this module, not
    # run it again and register `dllm_rl` a second time (lm-eval refuses a second, different class).
    sys.modules.setdefault("rl.lm_eval", sys.modules[__name__])
    main()
