"""Tokens/s of our layer-stack walk of a Llama against transformers' generate on the same model.

A Llama-shaped model of GPT-2 small's size (12 layers, width 768, 12 query heads sharing 4 kv
heads, SwiGLU 2048, vocab 32000, random weights), batch 1, greedy, 128 new tokens. Both run the
same transformers modules (our walk calls its projections, norms and MLPs); what differs is the
walk around them: our KV cache, one shared attention call, the rotary table computed once per step
and the decode layout of the weights. Goal on CPU: >= 1.0x.

    python bench/generation_families.py
    python bench/generation_families.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import IdTokenizer, generation_args, interleaved, report  # noqa: E402
from core.devices import resolve_dtype  # noqa: E402
from core.generation.autoregressive import SamplingConfig, generate  # noqa: E402
from core.models.decode_layout import use_decode_layout  # noqa: E402
from core.models.loading import LoadedModel  # noqa: E402
from core.models.stack import stack_for  # noqa: E402

VOCAB = 32000
NOTE = ("Both generators call the same transformers modules on the same weights, and a decoded token reads "
        "every weight once (~500 MB of float32 here), so both are bound by how fast the CPU streams the "
        "matrices; what GPT Lab adds around the modules (a preallocated KV cache instead of concatenation, "
        "the rotary table once per step, the decode layout of the weights, no per-step mask building) is "
        "small against that, and the ratio sits near 1 and moves with machine noise.")


def main() -> None:
    ap = generation_args(__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both generators (default: torch's; 1 is steadier on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                      initializer_range=0.05)
    hf = LlamaForCausalLM(cfg).eval().to(args.device, dtype)
    ours_model = copy.deepcopy(hf)   # our copy gets the decode layout (as load_model gives every CPU model)
    if args.device == "cpu":
        use_decode_layout(ours_model)
    tok = IdTokenizer()
    tok.vocab_size = VOCAB
    lm = LoadedModel(spec="bench", model=ours_model, tokenizer=tok, stack=stack_for(ours_model),
                     device=args.device, dtype=dtype, source="bench")
    prompt_ids = torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    prompt = " ".join(map(str, prompt_ids[0].tolist()))
    n = args.new_tokens
    sampling = SamplingConfig(max_new_tokens=n, greedy=True, n_alternatives=5)

    def run_ours() -> float:
        return len(generate(lm, prompt, sampling).tokens)

    def hf_generate(**kw):
        with torch.inference_mode():
            return hf.generate(prompt_ids.to(args.device), attention_mask=torch.ones_like(prompt_ids).to(args.device),
                               max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)

    def run_hf() -> float:
        return hf_generate(min_new_tokens=n).shape[1] - args.prompt_tokens

    same = [t.token_id for t in generate(lm, prompt, sampling).tokens] == hf_generate()[0, args.prompt_tokens:].tolist()
    interleaved({"ours": run_ours, "hf": run_hf}, 1)  # warm-up
    rates = interleaved({"ours": run_ours, "hf": run_hf}, args.repeats)
    ratio = rates["ours"] / rates["hf"]
    goal = 1.0
    n_params = sum(p.numel() for p in hf.parameters())
    body = (f"Llama-shaped model of GPT-2 small's size ({n_params / 1e6:.0f}M parameters: 12 layers, width 768, "
            f"12 query heads sharing 4 kv heads, SwiGLU 2048, vocab {VOCAB}, random weights), batch 1, "
            f"{args.prompt_tokens}-token prompt, {n} new tokens, greedy, {args.device} {args.dtype}, "
            f"{torch.get_num_threads()} CPU thread(s); median of "
            f"{args.repeats} interleaved runs.\n\n"
            f"| generator | tokens/s |\n|---|---:|\n| GPT Lab (layer-stack walk, KV cache, per-token logprobs + top-5) | "
            f"{rates['ours']:.1f} |\n| transformers `generate` | {rates['hf']:.1f} |\n\n"
            f"Ratio: **{ratio:.2f}x** (goal >= {goal}x: {'met' if ratio >= goal else 'NOT met'}). "
            f"Greedy tokens identical: {same}.\n")
    if args.device == "cpu":
        body += "\n" + NOTE + "\n"
    report(f"Generation, Llama family ({args.device}, {args.dtype})", body, write=not args.no_write)


if __name__ == "__main__":
    main()
