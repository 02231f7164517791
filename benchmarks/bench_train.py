"""Training throughput: padded batches (the Alpaca `train.py` way) vs correct packing, same data, same model.

    python benchmarks/bench_train.py                      # CPU: small random-init Llama, fp32
    python benchmarks/bench_train.py --threads 1          # on a busy machine (avoids OpenMP spin-waits)
    python benchmarks/bench_train.py --device cuda        # ~0.5B Qwen2-style random-init, bf16, prints MFU

Both modes go through `selfinstruct.train.build_trainer` and `Trainer.train()`, so the numbers include the
real collators, TRL's loss and the optimizer step. Padded: batches of `--batch-size` samples padded to the
longest in the batch (Alpaca pads per batch, max length 512). Packed: TRL best-fit-decreasing rows of
`--max-length` tokens with per-sample position ids (no cross-sample attention); rows per batch are chosen so
a step holds about as many real tokens as a padded step. Tokens/s counts non-padding input tokens over the
timed steps (after `--warmup` steps). MFU = 6 * parameters * tokens/s / peak bf16 dense FLOP/s.

The records are synthetic with Alpaca-like lengths: instruction 10-20 words, 40% with an input (log-normal,
median 12 words), output log-normal with median 32 and mean ~48 words (real Alpaca outputs are heavy-tailed:
many one-liners, some essays), prompt in the Alpaca template.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no what up out who them some "
    "into time more two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since against go "
    "came right used take three write list explain describe give summary answer question reason example"
).split()

PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def alpaca_like_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, k)))

    records = []
    for _ in range(n):
        instruction = text(rng.randint(10, 20)).capitalize() + "."
        has_input = rng.random() < 0.4
        inp = text(min(150, round(rng.lognormvariate(math.log(12), 0.7)))) if has_input else ""
        out = text(min(400, round(rng.lognormvariate(math.log(32), 0.9)))) + "."
        records.append({"instruction": instruction, "input": inp, "output": out})
    return records


def build_model(device: str, root: Path, texts: list[str]) -> tuple[Path, int]:
    """CPU: a small Llama. CUDA: a Qwen2-0.5B-shaped model (its 152k vocabulary included) in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from selfinstruct.tinymodel import build_tiny_model

    if device == "cpu":
        path = build_tiny_model(
            root / "model", texts, vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4,
            num_kv_heads=2, intermediate_size=688,
        )  # fmt: skip
    else:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        # only the tokenizer of this throwaway model is kept; the Qwen2 weights overwrite it
        path = build_tiny_model(
            root / "model", texts, vocab_size=4096, hidden_size=64, num_layers=1, num_heads=1
        )
        tok = AutoTokenizer.from_pretrained(path)
        config = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    with torch.device("meta"):
        n_params = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).num_parameters()
    return path, n_params


def measure(args, corpus: Path, model: Path, out: Path, packing: bool, batch_size: int) -> dict[str, float]:
    import torch
    from transformers import TrainerCallback

    from selfinstruct.train import TrainConfig, build_trainer

    cfg = TrainConfig(
        data=str(corpus), model=str(model), out=str(out), template="alpaca", packing=packing,
        batch_size=batch_size, grad_accum=1, max_length=args.max_length, max_steps=args.warmup + args.steps,
        learning_rate=1e-4, warmup_ratio=0.0, save_steps=10**6, logging_steps=10**6, resume=False,
        gradient_checkpointing=False, attn_implementation=args.attn,
    )  # fmt: skip
    trainer, *_ = build_trainer(cfg)
    trainer.args.include_num_input_tokens_seen = "non_padding"
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), state.num_input_tokens_seen))

    trainer.add_callback(Clock())
    trainer.train()
    (t0, n0), (t1, n1) = marks[args.warmup - 1], marks[-1]
    return {"tokens_per_s": (n1 - n0) / (t1 - t0), "seconds": t1 - t0, "tokens": n1 - n0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--batch-size", type=int, help="samples per padded step (default 16 on CPU, 128 on CUDA)")
    p.add_argument("--max-length", type=int, help="max tokens per sample / packed row (512 CPU, 2048 CUDA)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--attn", help="attention implementation (default: the model's, sdpa)")
    p.add_argument(
        "--peak-tflops", type=float, help="peak bf16 dense TFLOP/s for MFU (default: from GPU name)"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible")
    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (128 if gpu else 16)
    args.max_length = args.max_length or (2048 if gpu else 512)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = alpaca_like_records(args.records)
        corpus = root / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
        model, n_params = build_model(args.device, root, [" ".join(r.values()) for r in records])
        from transformers import AutoTokenizer

        from selfinstruct.train import format_alpaca_prompt

        tok = AutoTokenizer.from_pretrained(model)
        lengths = [
            len(
                tok(format_alpaca_prompt(r["instruction"], r["input"]) + r["output"] + tok.eos_token)[
                    "input_ids"
                ]
            )
            for r in records[:500]
        ]
        mean_len = sum(lengths) / len(lengths)
        rows = max(1, round(args.batch_size * mean_len / args.max_length))
        padded = measure(args, corpus, model, root / "padded", packing=False, batch_size=args.batch_size)
        packed = measure(args, corpus, model, root / "packed", packing=True, batch_size=rows)

    result = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({torch.get_num_threads()} threads)",
        "parameters": n_params,
        "mean_sample_tokens": round(mean_len, 1),
        "padded_batch_samples": args.batch_size,
        "packed_batch_rows": rows,
        "max_length": args.max_length,
        "padded_tokens_per_s": round(padded["tokens_per_s"]),
        "packed_tokens_per_s": round(packed["tokens_per_s"]),
        "ratio": round(packed["tokens_per_s"] / padded["tokens_per_s"], 2),
    }
    if gpu:
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak is None:
            raise SystemExit(f"unknown peak FLOP/s for {name}: pass --peak-tflops")
        for mode, r in (("padded", padded), ("packed", packed)):
            result[f"{mode}_mfu"] = round(6 * n_params * r["tokens_per_s"] / (peak * 1e12), 3)
        result["peak_tflops"] = peak
    print(json.dumps(result, indent=2))
    print(
        f"packed {result['packed_tokens_per_s']} tok/s vs padded {result['padded_tokens_per_s']} tok/s: "
        f"{result['ratio']}x"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
