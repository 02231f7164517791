"""`selfinstruct train`: supervised fine-tuning on a corpus with TRL's `SFTTrainer` (full, LoRA or QLoRA), or DPO.

The loss is instruction tuning as the seeds define it: the log-likelihood of the response (and its end-of-turn
token) given the instruction and input. Every record therefore becomes a prompt/completion pair and TRL's
`completion_only_loss` masks the prompt tokens (label -100). The prompt is rendered with the model's own chat
template when it has one that ends a turn with a special token, else with the Alpaca template (base models),
whose EOS TRL appends to the completion. With a chat template the turn's end token becomes the EOS (tokenizer,
model config, generation config): base models such as Qwen2.5 ship a ChatML template but stop on
`<|endoftext|>`, and would otherwise never stop after a tuned answer.

Conversations with several turns are trained on every assistant turn: they are tokenized here into rows whose
`completion_mask` covers exactly the assistant turns (`assistant_only_row`), and one longer than `--max-length`
is cut at exchange boundaries (`split_conversation`) instead of losing its last answers to truncation.

Packing must not let the samples that share a row attend to each other. TRL packs rows with best-fit
decreasing and restarts `position_ids` at every sample; transformers (>= 5) turns restarted positions into a
block-diagonal causal mask for sdpa/eager/flex attention, and varlen flash-attention kernels use the sample
boundaries directly. TRL also flattens the whole batch into one row ("padding-free"): right for varlen kernels,
but with sdpa/eager it multiplies the attention work by the number of rows, so there the rows stay separate
(`PackedRowCollator`). Before training, `check_packing` runs the real model and collator on one sample packed
after two different row-mates and alone; if its logits depend on its row-mate, training is refused instead of
silently learning across samples.

`--method dpo` trains on preference pairs (`selfinstruct prefs`' prefs.jsonl) with TRL's `DPOTrainer` instead,
with the same model, LoRA/QLoRA, precision, accelerate and resume options (`build_dpo_trainer`).

Rerunning on the same `--out` resumes from its last checkpoint (`checkpoint-N/`, written by the Trainer with
optimizer and scheduler state). The final model or adapter, its tokenizer, the resolved config
(`train_config.toml`) and a summary (`train_summary.json`) go to `--out`; `--merge` adds `OUT/merged`.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from selfinstruct.config import Section, save_config
from selfinstruct.corpus import load_corpus_any, read_json_records, read_rows
from selfinstruct.errors import InputFileError, UserError
from selfinstruct.evaluate import task_of
from selfinstruct.models import first_line, merge_adapter, resolve_model, torch_dtype
from selfinstruct.prompts import read_template
from selfinstruct.records import CorpusRecord
from selfinstruct.store import atomic_write_json


class TrainConfig(Section):
    """The `[train]` table and the `selfinstruct train` flags."""

    data: str | None = Field(
        None,
        description="corpus: a run directory, Alpaca JSON/JSONL, seed JSONL, chat JSONL (messages, ShareGPT "
        "conversations or prompt/completion; any number of turns) or Parquet; --method dpo: preference pairs (prefs.jsonl of selfinstruct prefs, or its run directory)",
    )
    method: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft: supervised fine-tuning (TRL SFTTrainer); dpo: direct preference optimization on "
        "chosen/rejected pairs (TRL DPOTrainer), usually starting from an SFT checkpoint",
    )
    beta: float = Field(
        0.1, gt=0, description="dpo: how far the policy may move from the reference (higher = closer)"
    )
    ref_model: str | None = Field(
        None,
        description="dpo: the reference model, named as --model, with the same tokenizer (default: --model "
        "itself; with LoRA, the base with the adapter switched off, so no second copy is loaded)",
    )
    model: str | None = Field(
        None,
        description="base model: a directory, a Hugging Face hub id, a .gguf file or a built-in name "
        "(smollm2-135m-instruct)",
    )
    out: str | None = Field(
        None, description="output directory (checkpoints, final model or adapter, config)"
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto",
        description="prompt format: the model's chat template (auto when it has one that ends turns with a "
        "special token) or the Alpaca template",
    )
    eos: str | None = Field(
        None,
        description="token the tuned model stops on, e.g. '<|im_end|>' (default: the token the chat template "
        "ends a turn with, else the tokenizer's EOS)",
    )
    lora: bool = Field(False, description="train a LoRA adapter instead of all weights")
    qlora: bool = Field(False, description="LoRA on a 4-bit NF4 base model (bitsandbytes, CUDA only)")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path")
    lora_target_modules: list[str] = Field(
        ["all-linear"],
        description="modules that get adapters ('all-linear' = every linear layer but the LM head)",
    )
    merge: bool = Field(
        False, description="also write the base model with the adapter merged in to OUT/merged"
    )
    packing: bool = Field(False, description="pack several samples per row (they never attend to each other)")
    epochs: float = Field(3.0, gt=0, description="passes over the training set (Alpaca: 3)")
    max_steps: int | None = Field(
        None, gt=0, description="stop after this many optimizer steps (overrides epochs)"
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="peak learning rate; default 2e-5 for full fine-tuning (Alpaca), 2e-4 for (Q)LoRA; "
        "dpo: 5e-7 full, 5e-6 (Q)LoRA (TRL's dpo script)",
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="learning-rate schedule after warmup (Alpaca: cosine)"
    )
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="fraction of steps for linear warmup (Alpaca: 0.03)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (Alpaca: 0)")
    batch_size: int = Field(4, gt=0, description="samples (or packed rows) per device per step")
    grad_accum: int = Field(
        8, gt=0, description="gradient accumulation steps (effective batch = batch x accum x GPUs)"
    )
    max_length: int = Field(
        512,
        gt=0,
        description="tokens per sample or packed row (longer Alpaca samples are cut, conversations split between "
        "turns); dpo: prompt plus answer (the answer is cut, a pair whose prompt fills it is dropped)",
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="fraction of tasks held out (all their records) for eval loss"
    )
    save_steps: int = Field(200, gt=0, description="checkpoint (and eval) every this many steps")
    save_total_limit: int = Field(2, gt=0, description="checkpoints kept in --out")
    logging_steps: int = Field(10, gt=0, description="log train loss every this many steps")
    seed: int = Field(42, description="seed for the eval split, shuffling and initialization")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="mixed precision: auto = bf16 on GPUs that support it, else fp32"
    )
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations to save memory (default: on with CUDA, off on CPU)"
    )
    attn_implementation: str | None = Field(
        None, description="attention kernel, e.g. sdpa, eager, flash_attention_2 (default: the model's)"
    )
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="experiment tracker (must be installed)"
    )
    resume: bool = Field(
        True, description="resume from the last checkpoint in --out; --no-resume starts over"
    )
    trust_remote_code: bool = Field(False, description="allow models that ship their own Python code")


@dataclass
class TrainResult:
    """What a run did and where it put things (also written to OUT/train_summary.json)."""

    out: str
    saved: Literal["model", "adapter"]
    global_step: int
    resumed_from: str | None
    train_examples: int
    eval_examples: int
    train_loss: float | None
    eval_loss: float | None
    seconds: float
    merged: str | None = None


# ---------------------------------------------------------------- corpus -> prompt/completion examples


def format_alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca training prompt; the response (then EOS) follows it directly."""
    name = "alpaca_train_input.txt" if input.strip() else "alpaca_train_noinput.txt"
    return read_template(name).format(instruction=instruction, input=input)


def load_corpus(data: str) -> tuple[Path, list[CorpusRecord]]:
    """Every record with something to learn: Alpaca records with an output (a seed file's instances count too)
    and conversations of any length (`selfinstruct.corpus`), whose assistant turns must all say something."""
    path, rows = read_rows(data)
    records = []
    for (line, _), record in zip(rows, load_corpus_any(path, rows), strict=False):
        if record.messages is None:
            if record.output.strip():
                records.append(record)
            continue
        if any(m["role"] == "assistant" and not m["content"].strip() for m in record.messages):
            raise InputFileError(path, line, "an assistant message is empty")
        records.append(record)
    if not records:
        raise UserError(f"{path}: no record has a non-empty output: nothing to train on")
    return path, records


def to_examples(records: list[CorpusRecord], template: Literal["chat", "alpaca"]) -> list[dict[str, Any]]:
    """Prompt/completion examples of single-exchange records: chat messages (TRL applies the template; a
    record's own system turn stays in the prompt) or Alpaca strings (TRL adds EOS)."""
    if template == "chat":
        examples = []
        for r in records:
            messages = r.conversation()
            examples.append({"prompt": messages[:-1], "completion": messages[-1:]})
        return examples
    if any(r.messages is not None and (r.turns > 1 or r.messages[0]["role"] == "system") for r in records):
        raise UserError(
            "--template alpaca holds one instruction and one answer: conversations with several turns or a "
            "system turn need --template chat"
        )
    return [{"prompt": format_alpaca_prompt(r.instruction, r.input), "completion": r.output} for r in records]


# ---------------------------------------------------------------- multi-turn conversations -> token rows


def _ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    """The conversation rendered by the chat template and tokenized as TRL does (no special tokens added)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the [start, end) token span of each assistant turn, in order:
    from after the template's generation prompt up to and including its end-of-turn text.

    Built from renders of each prefix of the conversation rather than from `{% generation %}` template tags,
    which few models' templates have; a template that renders earlier turns differently once later turns
    follow (some drop past reasoning) cannot be split this way and is refused.
    """
    ids = _ids(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, through = _ids(tokenizer, messages[:i], True), _ids(tokenizer, messages[: i + 1])
        if ids[: len(prompt)] != prompt or ids[: len(through)] != through or len(through) <= len(prompt):
            raise UserError(
                "the model's chat template renders earlier turns differently once later ones follow, so the "
                "assistant turns of a conversation cannot be located token by token; train on single-turn records"
            )
        spans.append((len(prompt), len(through)))
    return ids, spans


def assistant_only_row(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """`input_ids` of the whole conversation and a `completion_mask` that is 1 exactly on every assistant
    turn's tokens (`assistant_spans`): what training puts its loss on."""
    ids, spans = assistant_spans(tokenizer, messages)
    mask = [0] * len(ids)
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids, "completion_mask": mask}


def split_conversation(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> list[list[dict]]:
    """Pieces of at most `max_length` tokens cut at exchange boundaries (FastChat's `split_long_conversation`):
    each piece keeps the system turn and starts with a user turn, so no answer is truncated away. A single
    exchange longer than `max_length` stays a piece of its own (and is truncated)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    exchanges = [turns[k : k + 2] for k in range(0, len(turns), 2)]
    pieces: list[list[dict]] = []
    current: list[dict] = []
    for exchange in exchanges:
        if current and len(_ids(tokenizer, system + current + exchange)) > max_length:
            pieces.append(system + current)
            current = []
        current = current + exchange
    pieces.append(system + current)
    return pieces


def conversation_rows(records: list[CorpusRecord], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Token rows that train on every assistant turn, long conversations split at exchange boundaries."""
    return [
        assistant_only_row(tokenizer, piece)
        for r in records
        for piece in split_conversation(tokenizer, r.conversation(), max_length)
    ]


def multi_turn(records: list[CorpusRecord]) -> bool:
    return any(r.turns > 1 for r in records)


def _task_key(record: CorpusRecord | dict[str, Any]) -> str:
    """Records of one task share this key (as in `selfinstruct split`); a preference pair's key is its prompt."""
    if isinstance(record, CorpusRecord):
        return task_of(record)
    return json.dumps(record["prompt"], ensure_ascii=False, sort_keys=True)


def split_eval(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded hold-out of whole tasks (at least one task each side when a fraction is asked for).

    The instances of one task (`task_of`: task id, else the first user turn) never straddle the split: the eval
    loss would otherwise be measured on tasks the model trained on, and look better than it is.
    """
    if fraction <= 0:
        return records, []
    tasks = sorted({_task_key(r) for r in records})
    n_eval = max(1, round(len(tasks) * fraction))
    if n_eval >= len(tasks):
        raise UserError(f"--eval-fraction {fraction} leaves no training tasks out of {len(tasks)}")
    held = set(random.Random(seed).sample(tasks, n_eval))
    return [r for r in records if _task_key(r) not in held], [r for r in records if _task_key(r) in held]


# ---------------------------------------------------------------- packing


class PackedRowCollator:
    """Batch TRL-packed rows as separate rows, each with `position_ids` restarting at every sample and no
    `attention_mask`, so transformers builds a block-diagonal causal mask per row. Padding gets position 0
    too, which makes each pad token a sample of its own (never attended to, label -100). TRL's logged
    `num_tokens` counts one row per batch in this layout; the loss and the gradients are unaffected."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            labels[i, :n] = torch.tensor(e.get("labels", e["input_ids"]))
            position_ids[i, :n] = torch.cat([torch.arange(k) for k in e.get("seq_lengths", [n])])
        labels[position_ids == 0] = -100  # a sample's first token is not predicted from the previous sample
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _varlen_attention(implementation: str) -> bool:
    """Kernels that take the flattened batch with sample boundaries (TRL's padding-free layout)."""
    return "flash" in implementation


def check_packing(trainer: Any, length: int = 16) -> tuple[float, float] | None:
    """Prove on the real model and collator that packed samples are isolated, or raise `UserError`.

    A sample `b` is run packed after `a`, packed after `c`, and alone. Its logits must not depend on its
    row-mate (`leak`, compared at identical shapes, so kernels and precision match: ~0 unless attention
    crosses samples) and must match the lone run (`drift`, loose: catches wrong positions, allows bf16
    kernel noise). Returns (leak, drift) as relative mean differences, or None where this process holds no
    full weights (ZeRO-3 shards).
    """
    import torch

    model = trainer.model
    params = list(model.parameters())
    if any(p.device.type == "meta" or p.numel() == 0 for p in params):
        return None
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    a, b, c = (torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(3))
    device = params[0].device

    def logits_of_b(*before: list[int]) -> Any:
        ids = [t for s in before for t in s] + b
        batch = trainer.data_collator(
            [{"input_ids": ids, "labels": ids, "seq_lengths": [length] * (len(before) + 1)}]
        )
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), trainer.autocast_smart_context_manager():
            # as in training (TRL's compute_loss): a KV cache would disable the packed-sequence mask
            return model(**batch, use_cache=False).logits[0, -length:].float()

    def rel(x: Any, y: Any) -> float:
        return ((x - y).abs().mean() / y.abs().mean().clamp(min=1e-6)).item()

    was_training = model.training
    model.eval()
    try:
        after_a, after_c, alone = logits_of_b(a), logits_of_b(c), logits_of_b()
    finally:
        model.train(was_training)
    leak, drift = rel(after_a, after_c), rel(after_a, alone)
    if leak > 1e-3 or drift > 0.05:  # attending across samples moves logits by ~10% or more
        raise UserError(
            f"packing is not safe with attention '{model.config._attn_implementation}' for this model (a packed "
            f"sample's logits change with its row-mates by {leak:.1%}, vs alone by {drift:.1%}); train without "
            "--packing or use --attn-implementation flash_attention_2"
        )
    return leak, drift


# ---------------------------------------------------------------- model, trainer


def _check_options(cfg: TrainConfig, cuda: bool) -> None:
    for name in ("data", "model", "out"):
        if not getattr(cfg, name):
            raise UserError(f"train needs --{name}")
    if cfg.qlora:  # checked before any data or weights are read: 4-bit loading fails late and obscurely
        missing = [
            *([] if cuda else ["a CUDA GPU (none is visible)"]),
            *(
                []
                if importlib.util.find_spec("bitsandbytes")
                else ["the bitsandbytes package (pip install bitsandbytes)"]
            ),
        ]
        if missing:
            raise UserError(
                f"--qlora needs {' and '.join(missing)} for its 4-bit base; --lora trains the same adapter "
                "without them"
            )
    if cfg.ref_model and cfg.method != "dpo":
        raise UserError("--ref-model applies to --method dpo only")
    if cfg.merge and not (cfg.lora or cfg.qlora):
        raise UserError("--merge only applies to --lora or --qlora (a full fine-tune is already merged)")
    if cfg.precision in ("bf16", "fp16") and not cuda:
        raise UserError(f"--precision {cfg.precision} needs a CUDA GPU; on CPU use fp32")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(
            f"--report-to {cfg.report_to} needs the {cfg.report_to} package (pip install {cfg.report_to})"
        )


def _load_tokenizer(cfg: TrainConfig) -> tuple[str, Any]:
    """Resolve --model (directory, hub id, GGUF, adapter, built-in name) and load its tokenizer; a bad model
    fails fast with one line."""
    from transformers import AutoTokenizer

    path = resolve_model(str(cfg.model), "--model", trust_remote_code=cfg.trust_remote_code)
    try:
        return path, AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {cfg.model}: cannot load ({first_line(e)})") from None


_ANSWER_MARK = "SELFINSTRUCTANSWERMARK"


def end_of_turn(tokenizer: Any) -> str | None:
    """The special token the chat template closes an assistant turn with, or None (no template, or a turn that
    ends without a special token).

    Base models often ship a chat template whose turn ends with `<|im_end|>` / `<|eot_id|>` while their EOS is
    `<|endoftext|>` / `<|end_of_text|>`: a model tuned on that template must stop on the end-of-turn token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    from jinja2 import TemplateError

    turn = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _ANSWER_MARK}]
    try:
        text = tokenizer.apply_chat_template(turn, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError):  # a template that rejects this conversation
        return None
    after = text.partition(_ANSWER_MARK)[2]
    found = [(after.find(t), t) for t in _special_tokens(tokenizer) if t and t in after]
    return min(found)[1] if found else None


def _special_tokens(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {str(t) for t in getattr(tokenizer, "all_special_tokens", [])} | {
        t.content for t in added.values() if getattr(t, "special", False)
    }


def resolve_defaults(cfg: TrainConfig, tokenizer: Any, cuda: bool, bf16_ok: bool) -> TrainConfig:
    """Fill in every 'auto' so the saved config says what actually ran.

    `auto` picks the chat template only when it ends an assistant turn with a special token, and then that
    token becomes the EOS generation stops on; otherwise the Alpaca template with the tokenizer's EOS.
    """
    peft = cfg.lora or cfg.qlora
    turn_end = end_of_turn(tokenizer)
    template = cfg.template
    if template == "auto":
        template = "chat" if turn_end else "alpaca"
    eos = cfg.eos or (turn_end if template == "chat" and turn_end else tokenizer.eos_token)
    if cfg.eos and cfg.eos not in tokenizer.get_vocab():
        raise UserError(f"--eos {cfg.eos!r} is not a token of {cfg.model}'s tokenizer")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if cuda and bf16_ok else "fp32"
    # Checkpointing trades ~30% more compute for memory: worth it on GPUs, not for small models on a CPU.
    checkpointing = cuda if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    return cfg.model_copy(
        update={
            "lora": peft,
            "template": template,
            "eos": eos,
            "learning_rate": cfg.learning_rate or (2e-4 if peft else 2e-5),
            "precision": precision,
            "gradient_checkpointing": checkpointing,
        }
    )


def build_trainer(cfg: TrainConfig) -> tuple[Any, TrainConfig, int, int]:
    """Everything up to `trainer.train()`: returns (trainer, resolved config, #train, #eval examples)."""
    import torch

    cuda = torch.cuda.is_available()
    _check_options(cfg, cuda)
    data_path, records = load_corpus(str(cfg.data))
    model_path, tokenizer = _load_tokenizer(cfg)
    cfg = resolve_defaults(cfg, tokenizer, cuda, cuda and torch.cuda.is_bf16_supported())
    train_records, eval_records = split_eval(records, cfg.eval_fraction, cfg.seed)
    if cfg.template == "chat" and multi_turn(records):
        train_rows = conversation_rows(train_records, tokenizer, cfg.max_length)
        eval_rows = conversation_rows(eval_records, tokenizer, cfg.max_length)
    else:
        train_rows, eval_rows = (
            to_examples(train_records, cfg.template),
            to_examples(eval_records, cfg.template),
        )

    from trl import SFTConfig, SFTTrainer

    model_kwargs, quantization, peft_config = _model_options(cfg)
    args = SFTConfig(
        **_trainer_args(cfg, bool(eval_rows), cuda, model_kwargs),
        packing=cfg.packing,
        packing_strategy="bfd",
        eos_token=cfg.eos,  # TRL mirrors it into the model config and the saved generation config
        completion_only_loss=True,
        loss_type="nll",
    )
    trainer = _make_trainer(
        SFTTrainer, cfg, model_path, args, tokenizer, train_rows, eval_rows, peft_config, quantization
    )
    if cfg.packing:
        implementation = trainer.model.config._attn_implementation or "eager"
        if not _varlen_attention(implementation):
            trainer.data_collator = PackedRowCollator(tokenizer.pad_token_id)
        check_packing(trainer)
    if trainer.is_world_process_zero():
        print(f"training on {len(train_rows)} examples from {data_path} ({len(eval_rows)} held out for eval)")
    return trainer, cfg, len(train_rows), len(eval_rows)


def _make_trainer(
    trainer_cls: Any,
    cfg: TrainConfig,
    model_path: str,
    args: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    peft_config: Any,
    quantization: Any,
    **extra: Any,
) -> Any:
    """An SFT or DPO trainer over the rows; weights that cannot load are the user's `--model` error."""
    from datasets import Dataset

    try:
        return trainer_cls(
            model=model_path,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            quantization_config=quantization,
            **extra,
        )
    except (ImportError, OSError) as e:  # a missing kernel package, unreadable weights
        raise UserError(f"--model {cfg.model}: cannot load ({first_line(e)})") from None


def _trainer_args(
    cfg: TrainConfig, has_eval: bool, cuda: bool, model_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The `TrainingArguments` SFT and DPO share: schedule, batch, precision, checkpoints, logging."""
    return {
        "output_dir": str(cfg.out),
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps or -1,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler,
        "warmup_steps": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "max_length": cfg.max_length,
        "bf16": cfg.precision == "bf16",
        "fp16": cfg.precision == "fp16",
        "gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": cfg.save_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "logging_steps": cfg.logging_steps,
        "report_to": cfg.report_to,
        "seed": cfg.seed,
        "dataloader_pin_memory": cuda,
        "model_init_kwargs": model_kwargs,
    }


def _model_options(cfg: TrainConfig) -> tuple[dict[str, Any], Any, Any]:
    """(model_init_kwargs, quantization config, PEFT config) for a resolved config; shared by SFT and DPO."""
    import torch

    dtype = torch_dtype(cfg.precision)
    # Full fine-tuning keeps fp32 master weights under autocast; a frozen (Q)LoRA base can live in 16 bits.
    model_kwargs: dict[str, Any] = {"dtype": dtype if cfg.lora else torch.float32}
    if cfg.attn_implementation:
        model_kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.trust_remote_code:
        model_kwargs["trust_remote_code"] = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under accelerate launch: one whole model per process
        model_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))} if cfg.qlora else None
    quantization = peft_config = None
    if cfg.qlora:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    if cfg.lora:
        from peft import LoraConfig

        targets = cfg.lora_target_modules
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )
    return model_kwargs, quantization, peft_config


# ---------------------------------------------------------------- DPO


def load_prefs(data: str) -> tuple[Path, list[dict[str, list[dict[str, str]]]]]:
    """Preference pairs in TRL's conversational format (`prompt`, `chosen`, `rejected` message lists); a
    directory means its prefs.jsonl (a `selfinstruct prefs` run). Scores and meta are dropped: DPO only reads
    the conversations."""
    path = Path(data).expanduser()
    if path.is_dir():
        path = path / "prefs.jsonl"
        if not path.is_file():
            raise UserError(f"{path.parent}: no prefs.jsonl in this directory (pass a preference file)")
    pairs = []
    for line, obj in read_json_records(path):
        pair = {}
        for key in ("prompt", "chosen", "rejected"):
            messages = obj.get(key)
            if not isinstance(messages, list) or not messages:
                raise InputFileError(path, line, f"field '{key}' must be a non-empty list of messages")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise InputFileError(
                        path, line, f"bad message {m!r} in '{key}': role must be system, user or assistant"
                    )
                if not isinstance(m.get("content"), str):
                    raise InputFileError(path, line, f"a message in '{key}' needs a string 'content'")
            pair[key] = [{"role": m["role"], "content": m["content"]} for m in messages]
        if pair["prompt"][-1]["role"] != "user":
            raise InputFileError(path, line, "the prompt must end with a user message")
        for key in ("chosen", "rejected"):
            if (
                len(pair[key]) != 1
                or pair[key][0]["role"] != "assistant"
                or not pair[key][0]["content"].strip()
            ):
                raise InputFileError(path, line, f"'{key}' must be one non-empty assistant message")
        pairs.append(pair)
    return path, pairs


def _mirror_eos(model: Any, tokenizer: Any) -> None:
    """Make the model stop on the tokenizer's EOS (the turn's end token), as SFTTrainer does for `eos_token`."""
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id not in ids:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *ids]


def build_dpo_trainer(cfg: TrainConfig) -> tuple[Any, TrainConfig, int, int]:
    """`build_trainer` for `--method dpo`: TRL's DPOTrainer on preference pairs, same model options as SFT.

    The reference is `--ref-model` when given, else the starting model: TRL loads a second copy for a full
    fine-tune, and with (Q)LoRA computes it with the adapter switched off (no second copy).
    """
    import torch

    cuda = torch.cuda.is_available()
    _check_options(cfg, cuda)
    if cfg.packing:
        raise UserError("--packing applies to --method sft only")
    data_path, pairs = load_prefs(str(cfg.data))
    model_path, tokenizer = _load_tokenizer(cfg)
    ref_path = _ref_model_path(cfg, tokenizer) if cfg.ref_model else None
    peft = cfg.lora or cfg.qlora
    # TRL's dpo script: 5e-7 for a full fine-tune, 5e-6 with LoRA (an adapter starts from zero)
    cfg = cfg.model_copy(update={"learning_rate": cfg.learning_rate or (5e-6 if peft else 5e-7)})
    cfg = resolve_defaults(cfg, tokenizer, cuda, cuda and torch.cuda.is_bf16_supported())
    if cfg.template != "chat":
        raise UserError(
            f"--method dpo needs a model with a chat template that ends turns with a special token "
            f"(preference pairs are conversations); {cfg.model} has none"
        )
    tokenizer.eos_token = cfg.eos
    train_rows, eval_rows = split_eval(pairs, cfg.eval_fraction, cfg.seed)

    from trl import DPOConfig, DPOTrainer

    model_kwargs, quantization, peft_config = _model_options(cfg)
    ref_model = None
    if ref_path:
        from transformers import AutoModelForCausalLM

        # loaded like the policy (dtype, attention, 4-bit for QLoRA); TRL then uses it even with an adapter
        ref_kwargs = {**model_kwargs, **({"quantization_config": quantization} if quantization else {})}
        try:
            ref_model = AutoModelForCausalLM.from_pretrained(ref_path, **ref_kwargs)
        except (ImportError, OSError, ValueError) as e:
            raise UserError(f"--ref-model {cfg.ref_model}: cannot load ({first_line(e)})") from None
    args = DPOConfig(
        **_trainer_args(cfg, bool(eval_rows), cuda, model_kwargs),
        beta=cfg.beta,
    )
    trainer = _make_trainer(
        DPOTrainer,
        cfg,
        model_path,
        args,
        tokenizer,
        train_rows,
        eval_rows,
        peft_config,
        quantization,
        ref_model=ref_model,
    )
    _mirror_eos(trainer.model, tokenizer)
    n_train, n_eval = _kept_pairs(trainer, cfg, len(train_rows), len(eval_rows))
    if trainer.is_world_process_zero():
        print(f"DPO on {n_train} preference pairs from {data_path} ({n_eval} held out for eval)")
    return trainer, cfg, n_train, n_eval


def _ref_model_path(cfg: TrainConfig, tokenizer: Any) -> str:
    """Resolve `--ref-model` (any name `--model` accepts) before weights are loaded, and refuse a reference
    whose tokenizer differs from the policy's: DPO compares both models' log-probabilities of the same token
    ids, which only mean the same text under the same vocabulary."""
    from transformers import AutoTokenizer

    path = resolve_model(str(cfg.ref_model), "--ref-model", trust_remote_code=cfg.trust_remote_code)
    try:
        ref_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"--ref-model {cfg.ref_model}: cannot load its tokenizer ({first_line(e)})") from None
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"--ref-model {cfg.ref_model}: its tokenizer differs from that of --model {cfg.model} (the reference "
            "must score the same tokens: use the model the policy was tuned from)"
        )
    return path


def _kept_pairs(trainer: Any, cfg: TrainConfig, n_train: int, n_eval: int) -> tuple[int, int]:
    """Pairs left after TRL's tokenization: DPO (TRL >= 1) has one `max_length` for prompt plus answer, cuts
    the answer's end, and drops a pair whose prompt alone fills it. Returns (#train, #eval); refuses a split
    that lost every pair, and says how many were dropped."""
    kept_train = len(trainer.train_dataset)
    kept_eval = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    dropped = n_train - kept_train + n_eval - kept_eval
    if kept_train == 0 or (n_eval and kept_eval == 0):
        split = "training" if kept_train == 0 else "eval"
        raise UserError(
            f"--max-length {cfg.max_length}: every {split} pair's prompt fills it, so no {split} pair is left "
            "(raise --max-length)"
        )
    if dropped and trainer.is_world_process_zero():
        print(f"{dropped} pairs dropped: their prompt alone fills --max-length {cfg.max_length}")
    return kept_train, kept_eval


# ---------------------------------------------------------------- run


def _last_checkpoint(out: Path, resume: bool, main: bool) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not out.is_dir():
        return None
    if resume:
        return get_last_checkpoint(str(out))
    if main:  # --no-resume: stale checkpoints would be picked up by a later resume
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old)
    return None


def train(cfg: TrainConfig) -> TrainResult:
    """Train, save and (for LoRA with --merge) merge; see the module docstring for what lands where."""
    started = time.perf_counter()
    trainer, cfg, n_train, n_eval = (build_dpo_trainer if cfg.method == "dpo" else build_trainer)(cfg)
    out = Path(str(cfg.out))
    main = trainer.is_world_process_zero()
    checkpoint = _last_checkpoint(out, cfg.resume, main)
    if checkpoint and main:
        print(f"resuming from {checkpoint}")
    output = trainer.train(resume_from_checkpoint=checkpoint)
    eval_loss = trainer.evaluate()["eval_loss"] if n_eval else None
    trainer.save_model(str(out))
    result = TrainResult(
        out=str(out),
        saved="adapter" if cfg.lora else "model",
        global_step=trainer.state.global_step,
        resumed_from=checkpoint,
        train_examples=n_train,
        eval_examples=n_eval,
        train_loss=_last_logged(trainer, "loss") or output.training_loss,
        eval_loss=eval_loss,
        seconds=round(time.perf_counter() - started, 1),
    )
    if main:
        save_config("train", cfg, out / "train_config.toml")
        if cfg.merge:
            del trainer, output
            gc.collect()
            # the base in the training precision (dequantized for QLoRA), a rerun replaces the old merge
            base = resolve_model(str(cfg.model), "--model", trust_remote_code=cfg.trust_remote_code)
            merged = merge_adapter(
                out,
                out / "merged",
                base=base,
                dtype=torch_dtype(cfg.precision),
                trust_remote_code=cfg.trust_remote_code,
                replace=True,
            )
            # `evaluate --model OUT/merged` finds the template and the base model here, as it does in OUT
            save_config("train", cfg, merged / "train_config.toml")
            result.merged = str(merged)
        atomic_write_json(out / "train_summary.json", asdict(result))
    return result


def _last_logged(trainer: Any, key: str) -> float | None:
    """The most recent logged value (the run's average `training_loss` hides where it ended)."""
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[-1] if values else None


def run_train(cfg: TrainConfig) -> int:
    """CLI entry: train, then print a short summary on the main process."""
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        losses = (
            f"train loss {result.train_loss:.4f}" if result.train_loss is not None else "no train loss logged"
        )
        if result.eval_loss is not None:
            losses += f" · eval loss {result.eval_loss:.4f}"
        resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
        print(f"trained to step {result.global_step}{resumed} in {result.seconds:.0f} s · {losses}")
        print(f"saved {result.saved} + tokenizer + train_config.toml to {result.out}")
        if result.merged:
            print(f"merged model: {result.merged}")
    return 0
